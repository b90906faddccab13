//! TLS to the Redis server (`rediss://`): the certificate files of the config, read and checked
//! by [`comms_plugin_api::tls`], handed to the redis client.

use comms_plugin_api::{
    tls::{TlsFiles, TlsMaterial},
    PluginError,
};
use redis::{ClientTlsConfig, TlsCertificates};

pub(crate) use comms_plugin_api::tls::verification_failure;

/// Reads and checks the files of `files` (already validated: client certificate and key come
/// together). `None` when no file is set: the system's roots, no client certificate. A
/// `ca_file` replaces the system's roots.
pub(crate) fn load(files: &TlsFiles) -> Result<Option<TlsCertificates>, PluginError> {
    Ok(files.read()?.map(certificates))
}

fn certificates(material: TlsMaterial) -> TlsCertificates {
    TlsCertificates {
        client_tls: material
            .client
            .map(|client| ClientTlsConfig { client_cert: client.cert_chain, client_key: client.key }),
        root_cert: material.ca,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn certificate_failures_are_found_inside_redis_errors() {
        let unknown_ca = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let redis_error = redis::RedisError::from(io::Error::new(io::ErrorKind::InvalidData, unknown_ca));
        let cause = verification_failure(&redis_error).expect("a verification failure");
        assert!(cause.contains("certificate was not accepted") && cause.contains("UnknownIssuer"), "{cause}");
        let refused = redis::RedisError::from(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(verification_failure(&refused), None);
    }

    #[test]
    fn files_become_the_clients_certificates() {
        assert!(load(&TlsFiles::default()).unwrap().is_none());
        let missing = TlsFiles { ca_file: Some("/nonexistent/ca.pem".into()), ..TlsFiles::default() };
        let error = load(&missing).err().expect("an error");
        assert!(error.message.contains("key `ca_file`"), "{error}");
        let material = TlsMaterial {
            ca: Some(b"ca".to_vec()),
            client: Some(comms_plugin_api::tls::ClientIdentity {
                cert_chain: b"cert".to_vec(),
                key: b"key".to_vec(),
            }),
        };
        let TlsCertificates { client_tls, root_cert } = certificates(material);
        assert_eq!(root_cert.as_deref(), Some(&b"ca"[..]));
        let client = client_tls.expect("a client certificate");
        assert_eq!((client.client_cert, client.client_key), (b"cert".to_vec(), b"key".to_vec()));
    }
}
