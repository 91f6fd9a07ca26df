//! The cluster CA, the certificates it issues, and the rustls configurations built from them.
//!
//! Every certificate carries its role in the subject's organizational unit (`OU=augur:node`),
//! and every certificate names `CLUSTER_SERVER_NAME` among its DNS names: peers are verified
//! as "signed by this cluster's CA, with this role", not by host name, so nodes can move
//! between addresses without reissuing certificates.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};

use crate::error::TlsError;

/// The DNS name every certificate holds and every connection asks for.
pub const CLUSTER_SERVER_NAME: &str = "augur.cluster";
/// ALPN protocol id of Augur's RPC protocol.
pub const ALPN: &[u8] = b"augur/1";
/// Prefix of the organizational-unit value that carries a certificate's role.
const ROLE_OU_PREFIX: &str = "augur:";
/// Lifetime of issued certificates.
const CERT_VALIDITY_DAYS: i64 = 5 * 365;
/// Lifetime of the cluster CA.
const CA_VALIDITY_DAYS: i64 = 20 * 365;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// What a certificate's holder may do. Servers (meta members, storage nodes) and their callers
/// all authenticate with one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Meta,
    Node,
    Client,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Meta, Role::Node, Role::Client, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Meta => "meta",
            Role::Node => "node",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }

    /// Roles that run servers; a caller only talks to peers holding one of these.
    pub fn is_server(self) -> bool {
        matches!(self, Role::Meta | Role::Node)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| TlsError::UnknownRole(s.to_string()))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.display().to_string(), source }
}

fn bad(path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::BadMaterial { path: path.display().to_string(), reason: reason.to_string() }
}

/// Writes `contents` to `path`, refusing to replace an existing file; keys get mode 0600.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true).mode(if secret { 0o600 } else { 0o644 });
    let mut file = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError::Exists(path.display().to_string())
        } else {
            TlsError::Io { path: path.display().to_string(), source: e }
        }
    })?;
    file.write_all(contents.as_bytes()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // Backdate a little so peers with slightly slow clocks accept a fresh certificate.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Creates a new cluster CA in `dir` (`ca.pem`, `ca-key.pem`). Refuses to overwrite one.
pub fn init_ca(dir: &Path, cluster_name: &str) -> Result<(), TlsError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(TlsError::Exists(p.display().to_string()));
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, format!("{cluster_name} cluster CA"));
    params.distinguished_name.push(DnType::OrganizationName, "augur");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)
}

/// Checks a certificate holder's name: it becomes the CN and a DNS name of the certificate.
fn validate_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(TlsError::BadMaterial {
            path: name.to_string(),
            reason: "a certificate name must be 1-63 characters of letters, digits, '-' and '.'".into(),
        })
    }
}

/// Issues a certificate for `name` with `role`, signed by the CA in `ca_dir`, and writes
/// `cert.pem`, `key.pem` and `ca.pem` into `out_dir`.
pub fn issue(ca_dir: &Path, role: Role, name: &str, out_dir: &Path) -> Result<(), TlsError> {
    validate_name(name)?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| bad(&ca_key_path, e))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| bad(&ca_cert_path, e))?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string(), name.to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationName, "augur");
    params.distinguished_name.push(DnType::OrganizationalUnitName, format!("{ROLE_OU_PREFIX}{role}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every holder may act as both ends: nodes serve and also call other nodes.
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, CERT_VALIDITY_DAYS);
    let cert = params.signed_by(&key, &issuer)?;

    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    write_new(&out_dir.join(KEY_FILE), &key.serialize_pem(), true)?;
    write_new(&out_dir.join(CERT_FILE), &cert.pem(), false)?;
    write_new(&out_dir.join(CA_CERT_FILE), &ca_pem, false)
}

/// Reads the role out of a DER certificate. `None` when it carries no valid Augur role.
pub fn role_of(cert: &CertificateDer<'_>) -> Option<Role> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut roles = parsed
        .subject()
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .filter_map(|ou| ou.strip_prefix(ROLE_OU_PREFIX))
        .filter_map(|r| r.parse::<Role>().ok());
    let role = roles.next()?;
    // A certificate claiming two roles is malformed; trust neither.
    roles.next().is_none().then_some(role)
}

/// The common name of a DER certificate, for logs.
pub fn name_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// This process's TLS identity: its certificate, key and the cluster CA, loaded from a
/// directory written by `issue` (`cert.pem`, `key.pem`, `ca.pem`).
#[derive(Debug)]
pub struct TlsIdentity {
    pub dir: PathBuf,
    pub role: Role,
    pub name: String,
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            dir: self.dir.clone(),
            role: self.role,
            name: self.name.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsIdentity {
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let ca_path = dir.join(CA_CERT_FILE);
        for p in [&cert_path, &key_path, &ca_path] {
            if !p.is_file() {
                return Err(bad(
                    p,
                    "missing (create it with `augur cert issue --ca CA_DIR --role ROLE --name NAME --out DIR`)",
                ));
            }
        }
        let cert = CertificateDer::from_pem_file(&cert_path).map_err(|e| bad(&cert_path, e))?;
        let ca = CertificateDer::from_pem_file(&ca_path).map_err(|e| bad(&ca_path, e))?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| bad(&key_path, e))?;
        let role = role_of(&cert)
            .ok_or_else(|| bad(&cert_path, "certificate carries no augur role (OU=augur:ROLE)"))?;
        let name = name_of(&cert).unwrap_or_default();
        let identity = Self { dir: dir.to_path_buf(), role, name, ca, cert, key };
        // Build both configurations once so a key that does not match its certificate, or a
        // CA file that is not a CA, is reported here rather than at the first connection.
        identity.server_config().map_err(|e| bad(dir, e))?;
        identity.client_config().map_err(|e| bad(dir, e))?;
        Ok(identity)
    }

    /// A secret derived from this holder's private key for `purpose`: the same after a restart.
    fn derived_secret(&self, purpose: &str) -> ring::digest::Digest {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"augur v1 ");
        ctx.update(purpose.as_bytes());
        ctx.update(b"\0");
        ctx.update(self.key.secret_der());
        ctx.finish()
    }

    /// The key quinn derives stateless-reset tokens from, and the key of its connection-id
    /// generator. Both stay the same across restarts, so a restarted server recognises the
    /// connection ids its previous process issued and answers them with a valid stateless
    /// reset: callers then reconnect at once instead of waiting for an idle timeout.
    pub fn restart_stable_keys(&self) -> (ring::hmac::Key, u64) {
        let reset =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.derived_secret("stateless reset").as_ref());
        let cid = self.derived_secret("connection id");
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&cid.as_ref()[..8]);
        (reset, u64::from_le_bytes(cid_key))
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }

    /// Server side: TLS 1.3 only, a client certificate signed by the cluster CA required.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .map_err(|e| bad(&self.dir, e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Client side: TLS 1.3 only, the server verified against the cluster CA.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_role_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, "test").unwrap();
        assert!(matches!(init_ca(&ca, "test"), Err(TlsError::Exists(_))));
        for role in Role::ALL {
            let out = dir.path().join(role.as_str());
            issue(&ca, role, &format!("{role}-1"), &out).unwrap();
            let id = TlsIdentity::load(&out).unwrap();
            assert_eq!(id.role, role);
            assert_eq!(id.name, format!("{role}-1"));
        }
    }

    #[test]
    fn bad_names_roles_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, "test").unwrap();
        let err = issue(&ca, Role::Node, "bad name", &dir.path().join("x")).unwrap_err();
        assert!(err.to_string().contains("bad name"), "{err}");
        let err = "superuser".parse::<Role>().unwrap_err();
        assert!(err.to_string().contains("superuser"), "{err}");
        let err = TlsIdentity::load(&dir.path().join("nowhere")).unwrap_err();
        assert!(err.to_string().contains("cert.pem"), "{err}");
    }
}
