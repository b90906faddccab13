//! A private certificate authority made at run time (rcgen), for the TLS tests: included by each
//! with `#[path = "support/tls_ca.rs"] mod tls_ca;`.
#![allow(dead_code)]

use comms_tests::write_config;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};

/// A certificate authority made for one test.
pub(crate) struct TestCa {
    pub(crate) issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    /// Writes the CA certificate as PEM into `dir` and returns the path (the `ca_file`).
    pub(crate) fn write_pem(&self, dir: &Path, name: &str) -> PathBuf {
        write_config(dir, name, &self.issuer.pem())
    }

    /// A client certificate signed by this CA, written as PEM files into `dir`: (certificate, key).
    pub(crate) fn write_client_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["comms-client".to_string()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (
            write_config(dir, "client.pem", &certificate.pem()),
            write_config(dir, "client-key.pem", &key.serialize_pem()),
        )
    }

    /// A server certificate for `localhost` (a DNS name only: `127.0.0.1` is not in it) and its key.
    pub(crate) fn localhost(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (certificate, key) = self.localhost_certificate();
        (vec![certificate.der().clone()], PrivatePkcs8KeyDer::from(key.serialize_der()).into())
    }

    /// [`TestCa::localhost`] written as PEM files into `dir` (for a server that reads files, such
    /// as nats-server): (certificate, key).
    pub(crate) fn write_localhost_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let (certificate, key) = self.localhost_certificate();
        (
            write_config(dir, "localhost.pem", &certificate.pem()),
            write_config(dir, "localhost-key.pem", &key.serialize_pem()),
        )
    }

    fn localhost_certificate(&self) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        (params.signed_by(&key, &self.issuer).unwrap(), key)
    }
}
