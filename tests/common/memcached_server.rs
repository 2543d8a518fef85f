//! Real memcached servers for tests: a private `memcached` on a free
//! loopback port (64 MiB, one thread, default 1 MiB item limit), a
//! [`ServerProcess`] killed on drop, that a test can stop and start again
//! on the same port (an outage: its items are gone) or freeze (SIGSTOP). A small blocking
//! meta-protocol client reads items behind the gateway's back, with
//! timeouts, so a frozen server cannot hang a test.
//!
//! The binary comes from `MEMCACHED_BIN` (default `/usr/bin/memcached`
//! where it exists, else `memcached` on PATH); processes are
//! [`ServerProcess`]es.

use super::server::{program, ServerKind, ServerProcess};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

pub fn server_bin() -> String {
    let default = if std::path::Path::new("/usr/bin/memcached").exists() {
        "/usr/bin/memcached"
    } else {
        "memcached"
    };
    program("MEMCACHED_BIN", default)
}

pub struct MemcachedServer {
    pub port: u16,
    /// Stop (SIGKILL: its items are gone), start again on the same port,
    /// pause and resume it through this.
    pub process: ServerProcess,
}

impl MemcachedServer {
    pub fn start() -> MemcachedServer {
        let process = ServerProcess::start(ServerKind {
            name: "memcached",
            command: Box::new(|port, _| {
                let mut cmd = Command::new(server_bin());
                // As root memcached insists on -u; `root` keeps the
                // process's credentials, and with them the parent-death
                // signal (dropping to another user would clear it).
                if unsafe { libc::geteuid() } == 0 {
                    cmd.args(["-u", "root"]);
                }
                cmd.args(["-l", "127.0.0.1", "-p", &port.to_string()])
                    .args(["-U", "0", "-m", "64", "-t", "1", "-I", "1m"]);
                cmd
            }),
            ready: Box::new(|port, _| {
                Probe::connect(port).is_some_and(|mut p| p.command("mn") == "MN")
            }),
            install_hint: "Install it with `apt-get install memcached` (or set MEMCACHED_BIN)",
            start_timeout: Duration::from_secs(10),
            stop_signal: libc::SIGKILL,
        });
        MemcachedServer {
            port: process.port,
            process,
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The raw item under `key` and its remaining TTL in seconds (`-1`:
    /// none), or `None` if there is no such item.
    pub fn item(&self, key: &str) -> Option<(Vec<u8>, i64)> {
        let mut p = Probe::connect(self.port).expect("memcached answers");
        let head = p.command(&format!("mg {key} v t"));
        if head == "EN" {
            return None;
        }
        let fields: Vec<&str> = head.split(' ').collect();
        assert_eq!(fields[0], "VA", "mg {key}: {head}");
        let len: usize = fields[1].parse().unwrap();
        let ttl = fields
            .iter()
            .find_map(|f| f.strip_prefix('t'))
            .expect("t flag")
            .parse()
            .unwrap();
        let mut data = vec![0u8; len + 2];
        p.reader.read_exact(&mut data).unwrap();
        data.truncate(len);
        Some((data, ttl))
    }

    /// Store raw bytes under `key` (as another client would).
    pub fn set_raw(&self, key: &str, value: &[u8], exptime: u32) {
        let mut p = Probe::connect(self.port).expect("memcached answers");
        let mut cmd = format!("ms {key} {} T{exptime}\r\n", value.len()).into_bytes();
        cmd.extend_from_slice(value);
        cmd.extend_from_slice(b"\r\n");
        p.send(&cmd);
        assert_eq!(p.line(), "HD", "ms {key}");
    }

    /// Delete `key` (as another gateway would); `true` if it existed.
    pub fn delete_raw(&self, key: &str) -> bool {
        let mut p = Probe::connect(self.port).expect("memcached answers");
        match p.command(&format!("md {key}")).as_str() {
            "HD" => true,
            "NF" => false,
            other => panic!("md {key}: {other}"),
        }
    }

    /// `curr_items` from `stats`.
    pub fn items(&self) -> u64 {
        let mut p = Probe::connect(self.port).expect("memcached answers");
        p.send(b"stats\r\n");
        loop {
            let line = p.line();
            if let Some(n) = line.strip_prefix("STAT curr_items ") {
                return n.parse().unwrap();
            }
            assert_ne!(line, "END", "no curr_items in stats");
        }
    }
}

/// One blocking connection with short timeouts.
struct Probe {
    reader: BufReader<TcpStream>,
}

impl Probe {
    fn connect(port: u16) -> Option<Probe> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .ok()?;
        Some(Probe {
            reader: BufReader::new(stream),
        })
    }

    fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
    }

    /// One reply line without its CRLF ("" on a timeout or EOF).
    fn line(&mut self) -> String {
        let mut line = String::new();
        let _ = self.reader.read_line(&mut line);
        line.trim_end_matches(['\r', '\n']).to_string()
    }

    fn command(&mut self, command: &str) -> String {
        if self
            .reader
            .get_mut()
            .write_all(format!("{command}\r\n").as_bytes())
            .is_err()
        {
            return String::new();
        }
        self.line()
    }
}

/// The `store:` YAML for these servers, with `store.timeout`.
pub fn store_yaml(servers: &[&MemcachedServer], timeout_ms: u64) -> String {
    let list: Vec<String> = servers.iter().map(|s| s.addr()).collect();
    format!(
        "{{type: memcached, servers: [{}], timeout: {timeout_ms}ms}}",
        list.join(", ")
    )
}

/// Which of `servers` holds `key` (asked of each; `None`: none does).
pub fn holder(servers: &[&MemcachedServer], key: &str) -> Option<usize> {
    servers.iter().position(|s| s.item(key).is_some())
}
