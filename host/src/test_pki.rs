//! Tests only: a gateway PKI made as the guest's `pki` phase makes it (rcgen, EC P-256, a CA
//! limited to signing leaves, a server leaf with the guest's names and the server usage, a
//! client leaf with the client usage). The guest's generator lives in the init binary, not its
//! library, so the parameters are repeated here: `guest-init/src/phases/pki.rs` is the original.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};

/// The server certificate's names, as the guest's `SERVER_DNS_NAMES` and `SERVER_IPS`.
const SERVER_DNS_NAMES: &[&str] = &[
    "openshell",
    "openshell.openshell.svc",
    "openshell.openshell.svc.cluster.local",
    "localhost",
    "host.docker.internal",
];

/// The guest's validity: from a day back (its `BACKDATE`) for ten years (`VALIDITY_DAYS`).
fn validity(p: &mut CertificateParams) {
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(24 * 3600);
    p.not_before = (now - day).into();
    p.not_after = (now + 3650 * day).into();
}

/// A CA named `cn`: its PEM, its DER and what signs with it.
pub fn ca(cn: &str) -> (String, Vec<u8>, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("ca key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    validity(&mut p);
    p.distinguished_name
        .push(DnType::OrganizationName, "openshell");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).expect("ca");
    (cert.pem(), cert.der().to_vec(), Issuer::new(p, key))
}

fn leaf(issuer: &Issuer<'static, KeyPair>, server: bool) -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("leaf key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    let cn = if server {
        "openshell-server"
    } else {
        "openshell-client"
    };
    validity(&mut p);
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    if server {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        for name in SERVER_DNS_NAMES {
            let dns = (*name).try_into().expect("dns name");
            p.subject_alt_names.push(SanType::DnsName(dns));
        }
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    } else {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let cert = p.signed_by(&key, issuer).expect("leaf");
    (cert.pem(), key.serialize_pem())
}

/// A client certificate and its key (PEM), signed by `issuer`.
pub fn client(issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    leaf(issuer, false)
}

/// A server certificate and its key (PEM), signed by `issuer`.
pub fn server(issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    leaf(issuer, true)
}

/// What the guest's `pki` phase leaves: the CA and both leaves.
pub struct GatewayPki {
    pub ca: String,
    pub server: (String, String),
    pub client: (String, String),
}

impl GatewayPki {
    pub fn new() -> Self {
        let (ca, _, issuer) = ca("openshell-ca");
        Self {
            ca,
            server: server(&issuer),
            client: client(&issuer),
        }
    }
}
