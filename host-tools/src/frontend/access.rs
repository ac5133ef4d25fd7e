//! Who may use a front-end's API: a bearer token, and requests that a browser cannot forge.
//!
//! - The token: 256 random bits from the OS, written at start-up to
//!   `run/frontends/<ip>-<port>.token` (0600, in a 0700 directory owned by the front-end's
//!   user), so the same user's CLI and Application Agent read it by the URL they were given
//!   ([`find_token`]); another local user cannot. Every request carries
//!   `Authorization: Bearer <token>` (401 otherwise). `UNIPEER_FRONTEND_TOKEN` overrides the
//!   file (a front-end on another machine).
//! - `Host` must name this front-end: `localhost`, an IP literal, or a name given with
//!   `--allow-host`, with the listening port (400 otherwise): a DNS-rebound name is refused.
//! - A request with an `Origin` header is refused unless the origin is `http://` + its own
//!   `Host` (403): a page in a browser cannot drive the API cross-site.
//! - A `POST` must say `Content-Type: application/json` (415): a browser's "simple" cross-site
//!   form post cannot.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use super::RequestHead;
use crate::owner_only;

/// Environment variable holding a token for the front-ends the CLI talks to (instead of the
/// token files).
pub const TOKEN_ENV: &str = "UNIPEER_FRONTEND_TOKEN";

/// Where front-ends write their tokens: `run/frontends/` under the repository root.
pub fn token_dir() -> PathBuf {
    crate::image::repo_root().join("run").join("frontends")
}

/// The token file of a front-end listening on `addr`.
pub fn token_file(dir: &Path, addr: SocketAddr) -> PathBuf {
    let ip = addr.ip().to_string().replace(':', "_");
    dir.join(format!("{ip}-{}.token", addr.port()))
}

/// 256 bits from the OS's random source, as 64 hex digits.
pub fn new_token() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `token` for a front-end on `addr` (0600 file, 0700 directory); answers its path.
pub fn write_token(dir: &Path, addr: SocketAddr, token: &str) -> io::Result<PathBuf> {
    owner_only::create_dir(dir)?;
    let path = token_file(dir, addr);
    owner_only::write_file(&path, format!("{token}\n").as_bytes())?;
    Ok(path)
}

/// The token for the front-end at `authority` (`host:port`): `UNIPEER_FRONTEND_TOKEN` if set,
/// else the token file of any address it resolves to, or of a front-end on the unspecified
/// address (`0.0.0.0`, `::`) with that port.
pub fn find_token(dir: &Path, authority: &str) -> Option<String> {
    if let Ok(t) = std::env::var(TOKEN_ENV)
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_string());
    }
    let addrs: Vec<SocketAddr> = authority.to_socket_addrs().ok()?.collect();
    let mut candidates: Vec<SocketAddr> = addrs.clone();
    for a in &addrs {
        let any: IpAddr = if a.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        };
        candidates.push(SocketAddr::new(any, a.port()));
    }
    candidates.iter().find_map(|a| {
        let bytes = owner_only::read_file(&token_file(dir, *a)).ok()?;
        let t = String::from_utf8(bytes).ok()?.trim().to_string();
        (!t.is_empty()).then_some(t)
    })
}

/// Why a request was refused before it reached a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessRefused {
    /// The request has no `Host` header.
    NoHost,
    /// `Host` names another server (a DNS-rebound name, another port).
    ForeignHost { host: String, port: u16 },
    /// A cross-origin request (a page of another site in a browser).
    ForeignOrigin(String),
    /// No `Authorization: Bearer` token.
    NoToken,
    /// A token that is not this front-end's.
    WrongToken,
    /// A `POST` without `Content-Type: application/json`.
    NotJson,
}

impl AccessRefused {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            AccessRefused::NoHost | AccessRefused::ForeignHost { .. } => 400,
            AccessRefused::NoToken | AccessRefused::WrongToken => 401,
            AccessRefused::ForeignOrigin(_) => 403,
            AccessRefused::NotJson => 415,
        }
    }
}

impl std::fmt::Display for AccessRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessRefused::NoHost => f.write_str("the request has no Host header"),
            AccessRefused::ForeignHost { host, port } => write!(
                f,
                "Host {host:?} is not this front-end (localhost, an IP address or an \
                 --allow-host name, port {port})"
            ),
            AccessRefused::ForeignOrigin(o) => {
                write!(f, "cross-origin requests are refused (Origin {o:?})")
            }
            AccessRefused::NoToken => f.write_str(
                "this front-end needs `Authorization: Bearer TOKEN`; the token is in \
                 run/frontends/IP-PORT.token of the user who started it",
            ),
            AccessRefused::WrongToken => f.write_str("wrong front-end token"),
            AccessRefused::NotJson => f.write_str("a POST must be Content-Type: application/json"),
        }
    }
}

impl std::error::Error for AccessRefused {}

/// A front-end's access rule.
#[derive(Clone, Debug)]
pub struct AccessRule {
    token: String,
    /// The port the API listens on.
    port: u16,
    /// Host names accepted besides `localhost` and IP literals (lower case).
    names: Vec<String>,
}

impl AccessRule {
    pub fn new(token: String, port: u16, names: &[String]) -> AccessRule {
        AccessRule {
            token,
            port,
            names: names.iter().map(|n| n.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether `authority` (`host[:port]` of a `Host` header or an origin) names us.
    pub fn names_us(&self, authority: &str) -> bool {
        let (host, port) = match split_authority(authority) {
            Some(hp) => hp,
            None => return false,
        };
        let host = host.to_ascii_lowercase();
        let host_ok =
            host == "localhost" || host.parse::<IpAddr>().is_ok() || self.names.contains(&host);
        host_ok && port.unwrap_or(80) == self.port
    }

    /// The port the API listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Checks `Host`, `Origin`, the token and (for `POST`) the content type, in that order.
    pub fn check(&self, req: &RequestHead) -> Result<(), AccessRefused> {
        self.check_place(req)?;
        let presented = req
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(t) if same_secret(t.as_bytes(), self.token.as_bytes()) => {}
            Some(_) => return Err(AccessRefused::WrongToken),
            None => return Err(AccessRefused::NoToken),
        }
        if req.method == "POST" {
            let json = req.header("content-type").is_some_and(|ct| {
                ct.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
            if !json {
                return Err(AccessRefused::NotJson);
            }
        }
        Ok(())
    }

    /// Checks `Host` and `Origin` only: the request was sent to this front-end by no page of
    /// another site (what a browser's sign-in and session requests are held to).
    pub fn check_place(&self, req: &RequestHead) -> Result<(), AccessRefused> {
        let host = req.header("host").ok_or(AccessRefused::NoHost)?;
        // A CONNECT's Host is its target (RFC 9110 9.3.6); any other names this front-end.
        let host_ok = if req.method == "CONNECT" {
            host == req.target || self.names_us(host)
        } else {
            self.names_us(host)
        };
        if !host_ok {
            return Err(AccessRefused::ForeignHost {
                host: host.to_string(),
                port: self.port,
            });
        }
        if let Some(origin) = req.header("origin") {
            // Same origin only: the page was loaded from the very authority it now asks.
            let ours = origin
                .strip_prefix("http://")
                .is_some_and(|a| a.eq_ignore_ascii_case(host) && self.names_us(a));
            if !ours {
                return Err(AccessRefused::ForeignOrigin(origin.to_string()));
            }
        }
        Ok(())
    }
}

/// `host` and optional port of `host[:port]` or `[v6][:port]`; `None` if malformed.
fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    let parse_port = |p: &str| -> Option<u16> {
        (!p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse().ok())
            .flatten()
    };
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            p => Some((host, Some(parse_port(p.strip_prefix(':')?)?))),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, p)) if !host.contains(':') => Some((host, Some(parse_port(p)?))),
        Some(_) => None,
        None if !authority.is_empty() => Some((authority, None)),
        None => None,
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: method.into(),
            target: target.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_rule_checks_host_origin_token_and_content_type() {
        let rule = AccessRule::new("t0k".into(), 7700, &["fe.example".into()]);
        let auth = ("authorization", "Bearer t0k");
        let ok = |r: &RequestHead| rule.check(r).map_err(|e| e.status());
        assert_eq!(
            ok(&req("GET", "/v1/info", &[("host", "127.0.0.1:7700"), auth])),
            Ok(())
        );
        assert_eq!(
            ok(&req("GET", "/v1/info", &[("host", "localhost:7700"), auth])),
            Ok(())
        );
        assert_eq!(
            ok(&req("GET", "/v1/info", &[("host", "[::1]:7700"), auth])),
            Ok(())
        );
        assert_eq!(
            ok(&req(
                "GET",
                "/v1/info",
                &[("host", "FE.example:7700"), auth]
            )),
            Ok(())
        );
        // DNS rebinding, wrong port, no Host, garbage.
        for host in [
            "evil.example:7700",
            "127.0.0.1:7701",
            "localhost",
            "a:b:c",
            "[::1",
            "",
        ] {
            assert_eq!(
                ok(&req("GET", "/v1/info", &[("host", host), auth])),
                Err(400),
                "{host}"
            );
        }
        assert_eq!(ok(&req("GET", "/v1/info", &[auth])), Err(400));
        // Origins: ours passes, any other (and "null") is refused.
        let h = ("host", "127.0.0.1:7700");
        assert_eq!(
            ok(&req(
                "GET",
                "/",
                &[h, auth, ("origin", "http://127.0.0.1:7700")]
            )),
            Ok(())
        );
        for o in [
            "http://evil.example",
            "https://127.0.0.1:7700",
            "null",
            "http://localhost:80",
            "http://10.9.9.9:7700",
        ] {
            assert_eq!(
                ok(&req("GET", "/", &[h, auth, ("origin", o)])),
                Err(403),
                "{o}"
            );
        }
        // Tokens.
        assert_eq!(ok(&req("GET", "/", &[h])), Err(401));
        assert_eq!(
            ok(&req("GET", "/", &[h, ("authorization", "Bearer t0")])),
            Err(401)
        );
        assert_eq!(
            ok(&req("GET", "/", &[h, ("authorization", "Basic t0k")])),
            Err(401)
        );
        // POSTs are JSON.
        let ct = ("content-type", "application/json; charset=utf-8");
        assert_eq!(ok(&req("POST", "/v1/deploy", &[h, auth, ct])), Ok(()));
        assert_eq!(ok(&req("POST", "/v1/deploy", &[h, auth])), Err(415));
        let form = ("content-type", "text/plain");
        assert_eq!(ok(&req("POST", "/v1/deploy", &[h, auth, form])), Err(415));
        // A CONNECT's Host is its target.
        let c = req("CONNECT", "n1:7003", &[("host", "n1:7003"), auth]);
        assert_eq!(ok(&c), Ok(()));
        let c = req("CONNECT", "n1:7003", &[("host", "n2:7003"), auth]);
        assert_eq!(ok(&c), Err(400));
    }

    #[test]
    fn tokens_are_found_by_the_address_a_url_resolves_to() {
        let dir = std::env::temp_dir().join(format!("unipeer-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t = new_token().unwrap();
        assert_eq!(t.len(), 64);
        assert_ne!(t, new_token().unwrap());
        let p = write_token(&dir, "127.0.0.1:7788".parse().unwrap(), &t).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&p), mode(&dir)), (0o600, 0o700));
        if std::env::var(TOKEN_ENV).is_err() {
            assert_eq!(find_token(&dir, "127.0.0.1:7788"), Some(t.clone()));
            assert_eq!(find_token(&dir, "127.0.0.1:7789"), None);
            // A front-end on every address serves a URL naming one of them.
            write_token(&dir, "0.0.0.0:7790".parse().unwrap(), "any").unwrap();
            assert_eq!(find_token(&dir, "127.0.0.1:7790"), Some("any".into()));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
