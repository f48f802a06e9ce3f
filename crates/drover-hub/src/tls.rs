//! TLS for the hub: loading a certificate and key, or making a local CA and a server
//! certificate for a demo or a small site that has no public certificate.
//!
//! The generated CA lives in `<data_dir>/tls/ca.pem` (its key beside it, mode 0600). Agents name
//! that file in their config (`ca_file`) and trust only it, which is stronger than trusting the
//! whole public web PKI. The server certificate covers `localhost`, `127.0.0.1`, `::1` and any
//! names given; it is made once and reused on every later start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Making a certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate and key.
    #[error("the certificate and key do not work together: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where the files of a TLS setup are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server key.
    pub key: PathBuf,
    /// The local CA certificate, when the hub made one.
    pub ca: Option<PathBuf>,
}

/// Resolves a TLS config to files, generating a local CA and server certificate if asked to.
pub fn prepare(config: &TlsConfig, data_dir: &Path) -> Result<TlsFiles, TlsError> {
    if !config.self_signed {
        return match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => Ok(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: None,
            }),
            _ => Err(TlsError::Pem {
                path: data_dir.to_path_buf(),
                message: "TLS needs a certificate and a key".into(),
            }),
        };
    }
    let dir = data_dir.join("tls");
    let files = TlsFiles {
        cert: config
            .cert
            .clone()
            .unwrap_or_else(|| dir.join("server.pem")),
        key: config.key.clone().unwrap_or_else(|| dir.join("server.key")),
        ca: Some(dir.join("ca.pem")),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    generate(&dir, &files, &config.names)?;
    Ok(files)
}

fn generate(dir: &Path, files: &TlsFiles, names: &[String]) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Drover local CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    sans.extend(names.iter().cloned());
    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(sans)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "Drover hub");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    let ca_path = dir.join("ca.pem");
    write(&ca_path, ca_cert.pem().as_bytes(), false)?;
    write(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes(), true)?;
    write(&files.key, server_key.serialize_pem().as_bytes(), true)?;
    write(&files.cert, server_cert.pem().as_bytes(), false)?;
    tracing::info!(ca = %ca_path.display(), "created a local CA and server certificate");
    Ok(())
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    crate::files::write_file(path, bytes, secret).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A rustls server config from PEM files.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: files.cert.clone(),
            message: format!("reading certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: files.cert.clone(),
            message: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Pem {
        path: files.key.clone(),
        message: format!("reading the private key: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // HTTP/2 for clients that offer it (its compressed headers make a telemetry batch's
    // request a few bytes instead of a few hundred); HTTP/1.1 for the rest.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_setup_is_made_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let config = TlsConfig {
            cert: None,
            key: None,
            self_signed: true,
            names: vec!["hub.example.com".into()],
        };
        let files = prepare(&config, dir.path()).unwrap();
        let first = std::fs::read(&files.cert).unwrap();
        server_config(&files).unwrap();
        let again = prepare(&config, dir.path()).unwrap();
        assert_eq!(
            std::fs::read(&again.cert).unwrap(),
            first,
            "reused, not remade"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_missing_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope.key"),
            ca: None,
        };
        let err = server_config(&files).unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
    }
}
