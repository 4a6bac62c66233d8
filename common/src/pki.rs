//! Keys, certificate signing requests and the fleet certificate authority.
//!
//! Private keys are generated where they are used (the agent's on its host,
//! an operator's on their machine); only CSRs travel. The CA signs only the
//! public key of a CSR and writes the subject and the identity URI itself.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use time::OffsetDateTime;

use crate::Error;
use crate::identity::{Principal, certificate_serial};

/// Certificates are valid from a little before "now" so that a host whose
/// clock runs slightly behind the coordinator's accepts them at once.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(300);
/// Of a client certificate's lifetime, the part after which its holder
/// renews it: two thirds, leaving a third for retries and for moving to the
/// new certificate.
const RENEW_AT_NUMERATOR: i64 = 2;
const RENEW_AT_DENOMINATOR: i64 = 3;
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVER_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

/// A freshly generated private key and the CSR for it.
pub struct KeyAndCsr {
    /// PKCS#8 PEM. Secret: write it 0600 and never log it.
    pub key_pem: String,
    pub csr_pem: String,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Generates an ECDSA P-256 key and a CSR naming `common_name`.
pub fn generate_key_and_csr(common_name: &str) -> Result<KeyAndCsr, Error> {
    let key = KeyPair::generate().map_err(certificate_error)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    let csr = params.serialize_request(&key).map_err(certificate_error)?;
    Ok(KeyAndCsr {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem().map_err(certificate_error)?,
    })
}

/// When (Unix seconds) a client certificate valid from `not_before_unix`
/// to `not_after_unix` is due for renewal: at two thirds of the lifetime it
/// was issued for. The issue time is `not_before` plus the clock-skew
/// allowance this CA backdates by; without that, a one-minute certificate
/// (backdated five minutes) would look due at once.
pub fn renewal_due_unix(not_before_unix: i64, not_after_unix: i64) -> i64 {
    let issued = (not_before_unix + CLOCK_SKEW_ALLOWANCE.as_secs() as i64).min(not_after_unix);
    issued + (not_after_unix - issued) * RENEW_AT_NUMERATOR / RENEW_AT_DENOMINATOR
}

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub pem: String,
    pub der: Vec<u8>,
    /// Lower-case hex of the DER serial, as [`crate::identity::Identity::serial`].
    pub serial: String,
    pub not_after_unix: i64,
}

/// The fleet CA: signs agent, operator and server certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_der: Vec<u8>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &ca_fingerprint(&self.ca_der))
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Makes a new self-signed CA. Returns it and its private key (PEM, secret).
    pub fn generate(common_name: &str) -> Result<(CertificateAuthority, String), Error> {
        let key = KeyPair::generate().map_err(certificate_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial()?);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = now + CA_LIFETIME;
        let certificate = params.self_signed(&key).map_err(certificate_error)?;
        let key_pem = key.serialize_pem();
        let ca_pem = certificate.pem();
        let ca_der = certificate.der().to_vec();
        Ok((
            CertificateAuthority {
                issuer: Issuer::new(params, key),
                ca_pem,
                ca_der,
            },
            key_pem,
        ))
    }

    /// Loads the CA from its certificate and key (both PEM).
    pub fn load(ca_pem: &str, key_pem: &str) -> Result<CertificateAuthority, Error> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| Error::Certificate(format!("cannot read the CA key: {e}")))?;
        let ca_der = crate::tls::parse_certificates(ca_pem.as_bytes(), "CA certificate")?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Certificate("the CA file holds no certificate".into()))?
            .to_vec();
        let issuer = Issuer::from_ca_cert_pem(ca_pem, key)
            .map_err(|e| Error::Certificate(format!("cannot read the CA certificate: {e}")))?;
        Ok(CertificateAuthority {
            issuer,
            ca_pem: ca_pem.to_string(),
            ca_der,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// Signs a client certificate for `principal` over the public key of a
    /// CSR (whose own signature is checked; its subject is ignored).
    pub fn issue_client_from_csr(
        &self,
        principal: &Principal,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, Error> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::invalid("csr_pem", format!("not a valid signed CSR: {e}")))?;
        let now = OffsetDateTime::now_utc();
        self.issue_client(
            principal,
            &csr.public_key,
            now - CLOCK_SKEW_ALLOWANCE,
            now + lifetime,
        )
    }

    /// Signs a client certificate for `principal` with an explicit validity
    /// window (tests use this to make expired certificates).
    pub fn issue_client(
        &self,
        principal: &Principal,
        public_key: &impl PublicKeyData,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCertificate, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(principal.common_name());
        let uri = principal
            .to_uri()
            .try_into()
            .map_err(|e| Error::Certificate(format!("identity URI: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        self.sign(params, public_key)
    }

    /// Signs the coordinator's server certificate for `hosts` (DNS names or
    /// IP addresses). Returns the certificate and its new private key.
    pub fn issue_server(&self, hosts: &[String]) -> Result<(IssuedCertificate, String), Error> {
        let key = KeyPair::generate().map_err(certificate_error)?;
        let mut params = CertificateParams::new(hosts.to_vec()).map_err(certificate_error)?;
        params.distinguished_name = distinguished_name("cairn coordinator");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = now + SERVER_CERTIFICATE_LIFETIME;
        let issued = self.sign(params, &key)?;
        Ok((issued, key.serialize_pem()))
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<IssuedCertificate, Error> {
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let not_after_unix = params.not_after.unix_timestamp();
        let certificate = params
            .signed_by(public_key, &self.issuer)
            .map_err(certificate_error)?;
        let der = certificate.der().to_vec();
        Ok(IssuedCertificate {
            pem: certificate.pem(),
            serial: certificate_serial(&der)?,
            der,
            not_after_unix,
        })
    }
}

/// SHA-256 of the CA certificate's DER, lower-case hex: what an enrollment
/// token pins (as kubeadm's `--discovery-token-ca-cert-hash` does).
pub fn ca_fingerprint(ca_der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, ca_der))
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "cairn");
    name.push(DnType::CommonName, common_name);
    name
}

/// `len` bytes from the operating system's random source.
pub fn random_bytes(len: usize) -> Result<Vec<u8>, Error> {
    let mut bytes = vec![0u8; len];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Certificate("the system random source failed".into()))?;
    Ok(bytes)
}

fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = random_bytes(16)?;
    // A positive INTEGER: clear the top bit, and never start with a zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x10;
    Ok(SerialNumber::from(bytes))
}

/// Whether the certificate (DER) carries the public key of `key_pem`: a
/// renewed certificate must be for the key just generated, or installing
/// it would lock its holder out.
pub fn certificate_matches_key(certificate_der: &[u8], key_pem: &str) -> Result<bool, Error> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let key = KeyPair::from_pem(key_pem).map_err(certificate_error)?;
    let (_, certificate) = X509Certificate::from_der(certificate_der)
        .map_err(|e| Error::invalid("certificate", e.to_string()))?;
    Ok(certificate.public_key().raw == key.subject_public_key_info().as_slice())
}

fn certificate_error(error: rcgen::Error) -> Error {
    Error::Certificate(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, Role};
    use crate::names::{AgentName, OperatorName};

    #[test]
    fn a_certificate_matches_only_the_key_it_was_issued_for() {
        let (ca, _) = CertificateAuthority::generate("test CA").unwrap();
        let principal = Principal::Agent(AgentName::new("db1").unwrap());
        let mine = generate_key_and_csr("db1").unwrap();
        let other = generate_key_and_csr("db1").unwrap();
        let issued = ca
            .issue_client_from_csr(&principal, &mine.csr_pem, Duration::from_secs(3600))
            .unwrap();
        assert!(certificate_matches_key(&issued.der, &mine.key_pem).unwrap());
        assert!(!certificate_matches_key(&issued.der, &other.key_pem).unwrap());
    }

    /// A one-minute certificate is due at 40 s, a year's at eight months,
    /// however far the CA backdated it.
    #[test]
    fn renewal_is_due_at_two_thirds_of_the_issued_lifetime() {
        let (ca, key_pem) = CertificateAuthority::generate("test CA").unwrap();
        let ca = CertificateAuthority::load(ca.ca_pem(), &key_pem).unwrap();
        let principal = Principal::Agent(AgentName::new("db1").unwrap());
        for lifetime_secs in [60, 365 * 24 * 3600] {
            let request = generate_key_and_csr("db1").unwrap();
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let issued = ca
                .issue_client_from_csr(
                    &principal,
                    &request.csr_pem,
                    Duration::from_secs(lifetime_secs),
                )
                .unwrap();
            let (not_before, not_after) =
                crate::identity::certificate_validity(&issued.der).unwrap();
            let due = renewal_due_unix(not_before, not_after);
            let expected = now + lifetime_secs as i64 * 2 / 3;
            assert!(
                (due - expected).abs() <= 1,
                "lifetime {lifetime_secs}s: due {due}, expected {expected}"
            );
        }
    }

    #[test]
    fn issued_certificates_carry_the_identity_and_serial() {
        let (ca, key_pem) = CertificateAuthority::generate("test CA").unwrap();
        let ca = CertificateAuthority::load(ca.ca_pem(), &key_pem).unwrap();
        for principal in [
            Principal::Agent(AgentName::new("db1").unwrap()),
            Principal::Operator {
                name: OperatorName::new("alice").unwrap(),
                role: Role::Viewer,
            },
        ] {
            let request = generate_key_and_csr("ignored").unwrap();
            let issued = ca
                .issue_client_from_csr(&principal, &request.csr_pem, Duration::from_secs(3600))
                .unwrap();
            let identity = Identity::from_certificate_der(&issued.der).unwrap();
            assert_eq!(identity.principal, principal);
            assert_eq!(identity.serial, issued.serial);
            assert_eq!(identity.not_after_unix, issued.not_after_unix);
        }
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let (ca, _) = CertificateAuthority::generate("test CA").unwrap();
        let request = generate_key_and_csr("original-name").unwrap();
        let mut der = pem::parse(&request.csr_pem).unwrap().into_contents();
        let at = der.windows(13).position(|w| w == b"original-name").unwrap();
        der[at] = b'X';
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let principal = Principal::Agent(AgentName::new("db1").unwrap());
        assert!(
            ca.issue_client_from_csr(&principal, &tampered, Duration::from_secs(60))
                .is_err()
        );
    }
}
