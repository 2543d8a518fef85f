//! A private certificate authority for TLS tests, made with the `openssl`
//! command line in a temp dir: EC P-256 keys, a CA certificate and leaf
//! certificates with the subject alternative names a test asks for.
//! A missing `openssl` fails the test with the command that installs it.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestCa {
    dir: tempfile::TempDir,
    issued: std::cell::Cell<u32>,
}

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Leaf {
    /// The DER of the certificate (what a TLS client sees).
    pub fn der(&self) -> Vec<u8> {
        pem_to_der(&std::fs::read_to_string(&self.cert).unwrap())
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = match Command::new("openssl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`openssl` not found: the TLS tests make their certificates with it. \
             Install it: apt-get install openssl (./scripts/test does)"
        ),
        Err(e) => panic!("cannot run openssl: {e}"),
    };
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().expect("temp dir for the test CA");
        let mut args = vec!["req", "-x509", "-nodes"];
        args.extend(EC);
        args.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=session-gateway test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir.path(), &args);
        TestCa {
            dir,
            issued: std::cell::Cell::new(0),
        }
    }

    /// The CA certificate (PEM): what clients and the gateway trust.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `sans` (e.g. `["DNS:localhost",
    /// "IP:127.0.0.1"]`), signed by this CA, in new files.
    pub fn issue(&self, sans: &[&str]) -> Leaf {
        let n = self.issued.get() + 1;
        self.issued.set(n);
        let name = format!("leaf{n}");
        let dir = self.dir.path();
        let ext = format!(
            "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
            sans.join(",")
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, cert, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let mut args = vec!["req", "-nodes"];
        args.extend(EC);
        args.extend([
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=session-gateway test",
        ]);
        openssl(dir, &args);
        let serial = format!("{}", 1000 + n);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &serial,
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
        );
        Leaf {
            cert: dir.join(cert),
            key: dir.join(key),
        }
    }

    /// The CA certificate as reqwest takes it.
    pub fn reqwest_root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(&std::fs::read(self.cert()).unwrap()).unwrap()
    }
}

/// The DER of the first certificate in a PEM text.
pub fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM body is base64")
}
