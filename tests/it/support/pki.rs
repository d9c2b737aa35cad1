//! The test PKI: a CA generated at test time and the certificates it signs, for the fake
//! apiserver, the HTTPS listener's certificate files, Pebble's API and the doctor's broken
//! sites.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA and the certificates it signs.
pub struct Pki {
    pub ca_pem: String,
    params: CertificateParams,
    key: KeyPair,
}

/// A certificate chain and its private key, both PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new(common_name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA cert");
        Self {
            ca_pem: cert.pem(),
            params,
            key,
        }
    }

    fn leaf(&self, common_name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// The apiserver's serving certificate, with the SANs k3s gives it.
    pub fn server(&self) -> Leaf {
        self.leaf(
            "kube-apiserver",
            &["kubernetes.default.svc", "localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A serving certificate for other names (a public site, an ACME server).
    pub fn server_for(&self, sans: &[&str]) -> Leaf {
        self.leaf(sans[0], sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A serving certificate that expired in 2022.
    pub fn expired_server_for(&self, sans: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, sans[0]);
        params.not_before = rcgen::date_time_ymd(2021, 1, 1);
        params.not_after = rcgen::date_time_ymd(2022, 1, 1);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A serving certificate valid from `not_before` to `not_after` (whole seconds).
    pub fn server_valid_between(
        &self,
        sans: &[&str],
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Leaf {
        let at = |t: std::time::SystemTime| {
            rcgen::date_time_ymd(1970, 1, 1)
                + Duration::from_secs(
                    t.duration_since(std::time::UNIX_EPOCH)
                        .expect("after 1970")
                        .as_secs(),
                )
        };
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, sans[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = at(not_before);
        params.not_after = at(not_after);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A client certificate, as in k3s's admin kubeconfig (`CN=system:admin`).
    pub fn client(&self, common_name: &str) -> Leaf {
        self.leaf(common_name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}
