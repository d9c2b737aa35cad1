#!/usr/bin/env python3
"""Small load tools for benches/compare.sh (standard library only).

  load.py rate URL RATE SECONDS CONNS     fixed offered load over keep-alive HTTPS connections;
                                           prints "p50_ms p99_ms sent errors"
  load.py hold HOST PORT N                 opens N TLS connections, completes the handshakes,
                                           prints "ready", holds them until stdin closes
  load.py startup URL -- CMD...            runs CMD, prints ms from exec to the first 200 of URL
"""
import asyncio, os, socket, ssl, subprocess, sys, time

def ctx():
    c = ssl.create_default_context()
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    return c

async def rate(url, rate, seconds, conns):
    host, port, path = parse(url)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    lat, errors, sent = [], 0, 0
    queue = asyncio.Queue()
    async def worker():
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx(), server_hostname="bench.test")
        while True:
            scheduled = await queue.get()
            if scheduled is None:
                writer.close(); return
            try:
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
                await reader.readexactly(length)
                lat.append(time.perf_counter() - scheduled)  # from the scheduled send: no coordinated omission
            except Exception:
                errors += 1
    workers = [asyncio.create_task(worker()) for _ in range(conns)]
    await asyncio.sleep(0.5)
    start = time.perf_counter()
    interval = 1.0 / rate
    while (now := time.perf_counter()) - start < seconds:
        due = start + sent * interval
        if due > now:
            await asyncio.sleep(due - now)
        queue.put_nowait(due)
        sent += 1
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers, return_exceptions=True)
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")
    print(f"{pick(0.50):.3f} {pick(0.99):.3f} {sent} {errors}")

def hold(host, port, n):
    socks = []
    for _ in range(n):
        s = ctx().wrap_socket(socket.create_connection((host, int(port))), server_hostname="bench.test")
        socks.append(s)
    print("ready", flush=True)
    sys.stdin.read()

def startup(url, cmd):
    host, port, path = parse(url)
    context = ctx()  # loading the CA bundle takes milliseconds: not part of the measure
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - started < 5:
            try:
                s = context.wrap_socket(socket.create_connection((host, port), timeout=1), server_hostname="bench.test")
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    print(f"{(time.perf_counter() - started) * 1000:.1f}")
                    return
            except OSError:
                pass
        print("nan")
    finally:
        proc.terminate(); proc.wait()

def parse(url):
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    return host, int(port), "/" + path

if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "rate":
        asyncio.run(rate(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])))
    elif mode == "hold":
        hold(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "startup":
        startup(sys.argv[2], sys.argv[sys.argv.index("--") + 1:])
