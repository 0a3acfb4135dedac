//! The broker URL from the configuration (`mqtt://host:port`, `mqtts://host:port`), parsed.

use super::MqttLinkError;

/// Where the broker listens and whether the connection is TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BrokerAddress {
    /// Host name or IP address (IPv6 literals keep their brackets, as socket lookup expects).
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddress {
    /// Parses `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (TLS, 8883).
    pub fn parse(url: &str) -> Result<Self, MqttLinkError> {
        let bad = |why: &str| MqttLinkError::Config(format!("broker url {url:?}: {why}"));
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(bad("must start with mqtt:// or mqtts://"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(bad("must not have a path or query"));
        }
        if authority.contains('@') {
            return Err(bad("credentials belong in `username` and `password_file`, not in the url"));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (inside, after) = v6.split_once(']').ok_or_else(|| bad("unclosed `[` in the host"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("expected `:port` after `]`"))?),
            };
            (format!("[{inside}]"), port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host.to_string(), Some(port)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(bad("has no host"));
        }
        let port = match port {
            None => default_port,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("invalid port"))?,
        };
        Ok(Self { host, port, tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> BrokerAddress {
        BrokerAddress::parse(url).unwrap()
    }

    #[test]
    fn schemes_choose_tls_and_the_default_port() {
        assert_eq!(parse("mqtt://broker"), BrokerAddress { host: "broker".into(), port: 1883, tls: false });
        assert_eq!(parse("mqtts://broker/"), BrokerAddress { host: "broker".into(), port: 8883, tls: true });
        assert_eq!(parse("mqtt://127.0.0.1:1999").port, 1999);
        assert_eq!(parse("mqtts://[::1]:8884").host, "[::1]");
    }

    #[test]
    fn unusable_urls_say_why() {
        for (url, why) in [
            ("tcp://broker", "must start with"),
            ("mqtt://", "no host"),
            ("mqtt://broker:0", "invalid port"),
            ("mqtt://broker:99999", "invalid port"),
            ("mqtt://user:pw@broker", "credentials"),
            ("mqtt://broker/topic", "path"),
            ("mqtt://[::1", "unclosed"),
        ] {
            let err = BrokerAddress::parse(url).unwrap_err().to_string();
            assert!(err.contains(why), "{url}: {err}");
        }
    }
}
