//! Debian's nginx (package nginx-light) in the foreground, configured by the test's own
//! `server { … }` blocks, stopped by its PID when the handle drops (also when a test fails).
//! nginx cannot report a port it chose, so the test picks a free one first
//! (`pebble::free_tcp_port`), a race the config leaves no way around.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Scratch;

#[derive(Debug)]
pub struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nginx's master must stop its workers.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

/// nginx serving `servers` (the `server { … }` blocks of its `http` block, with their own
/// `listen` lines), its temporary files and logs in `scratch`; returns once `port` accepts.
/// `name` keeps several instances in one scratch directory apart.
pub fn start(scratch: &Scratch, name: &str, port: u16, servers: &str) -> Nginx {
    let dir = scratch.dir.path().join(name);
    std::fs::create_dir_all(&dir).expect("nginx directory");
    let dir = dir.display();
    let conf = scratch.write(
        &format!("{name}.conf"),
        &format!(
            "daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
               fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
             {servers}\n}}\n"
        ),
    );
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (package nginx-light)");
    let nginx = Nginx(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        let log = std::fs::read_to_string(format!("{dir}/error.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "nginx did not start: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    nginx
}
