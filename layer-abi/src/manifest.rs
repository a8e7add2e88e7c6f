//! The plugin manifest: what a host may know about a plugin library without
//! running any of its code.
//!
//! The export macro writes it at compile time into the exported symbol
//! [`MANIFEST_SYMBOL`](crate::abi::MANIFEST_SYMBOL): a byte array of
//! [`MANIFEST_CAPACITY`] bytes holding [`MANIFEST_MAGIC`], then one JSON
//! object, then zero bytes. A host reads it from the library file with an
//! object-file parser, before it opens the library. The JSON object:
//!
//! | field | meaning |
//! | --- | --- |
//! | `name` | the layer name models use; equal to the library's file name (`libNAME.so`) |
//! | `version` | the plugin crate's version |
//! | `description` | one line saying what the layer computes |
//! | `abi` | `[major, minor]`: the interface version the plugin was built against |
//! | `layer_api` | the version of the layer-api crate it was built with (information only) |
//! | `offers` | capabilities its table provides beyond the 1.0 core (`flops`, `prepare`, `backward`, `lend-pool`) |
//! | `needs` | capabilities the host must have for the plugin to work at all |
//! | `panic` | `unwind` or `abort`: the plugin's panic strategy |
//! | `abi_stable` | `major.minor` of the abi_stable crate whose layout descriptions the table points to (absent: 0.11) |
//!
//! Later 1.x versions may add fields; readers ignore fields they do not know.

use serde::Deserialize;

use crate::abi::{MANIFEST_CAPACITY, MANIFEST_MAGIC};

/// A manifest, as a host reads it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    pub abi: (u32, u32),
    #[serde(default)]
    pub layer_api: String,
    #[serde(default)]
    pub offers: Vec<String>,
    #[serde(default)]
    pub needs: Vec<String>,
    pub panic: String,
    /// The abi_stable version whose `TypeLayout` the plugin's table points
    /// to; the host reads that description only if it is its own.
    #[serde(default = "default_abi_stable")]
    pub abi_stable: String,
}

fn default_abi_stable() -> String {
    "0.11".to_string()
}

impl Manifest {
    /// Parses the bytes of a manifest symbol: the magic, then JSON up to the
    /// first zero byte.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let body = bytes
            .strip_prefix(&MANIFEST_MAGIC[..])
            .ok_or("the manifest does not start with its magic bytes")?;
        let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
        let text = std::str::from_utf8(&body[..end])
            .map_err(|_| "the manifest is not UTF-8 text".to_string())?;
        serde_json::from_str(text).map_err(|e| format!("the manifest is not valid: {e}"))
    }
}

/// The pieces of a manifest, as the export macro knows them at compile time.
#[doc(hidden)]
pub struct ManifestParts<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub description: &'a str,
    pub layer_api: &'a str,
    pub abi: (u32, u32),
    pub offers: &'a [&'a str],
    pub needs: &'a [&'a str],
    pub abi_stable: &'a str,
    pub panic_abort: bool,
}

/// Writes the manifest bytes at compile time. A description too long for
/// the symbol stops the build with a message.
#[doc(hidden)]
pub const fn build_manifest(parts: &ManifestParts<'_>) -> [u8; MANIFEST_CAPACITY] {
    let mut w = Writer {
        buf: [0; MANIFEST_CAPACITY],
        len: 0,
    };
    w.raw(MANIFEST_MAGIC);
    w.raw(b"{\"name\":");
    w.string(parts.name);
    w.raw(b",\"version\":");
    w.string(parts.version);
    w.raw(b",\"description\":");
    w.string(parts.description);
    w.raw(b",\"abi\":[");
    w.number(parts.abi.0);
    w.raw(b",");
    w.number(parts.abi.1);
    w.raw(b"],\"layer_api\":");
    w.string(parts.layer_api);
    w.raw(b",\"offers\":");
    w.list(parts.offers);
    w.raw(b",\"needs\":");
    w.list(parts.needs);
    w.raw(b",\"panic\":");
    w.string(if parts.panic_abort { "abort" } else { "unwind" });
    w.raw(b",\"abi_stable\":");
    w.string(parts.abi_stable);
    w.raw(b"}");
    w.buf
}

struct Writer {
    buf: [u8; MANIFEST_CAPACITY],
    len: usize,
}

impl Writer {
    const fn byte(&mut self, b: u8) {
        // One zero byte must remain to end the text.
        if self.len + 1 >= MANIFEST_CAPACITY {
            panic!("the plugin manifest is too long: shorten the layer's description");
        }
        self.buf[self.len] = b;
        self.len += 1;
    }

    const fn raw(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            self.byte(bytes[i]);
            i += 1;
        }
    }

    const fn string(&mut self, s: &str) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bytes = s.as_bytes();
        self.byte(b'"');
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'"' || b == b'\\' {
                self.byte(b'\\');
                self.byte(b);
            } else if b < 0x20 {
                self.raw(b"\\u00");
                self.byte(HEX[(b >> 4) as usize]);
                self.byte(HEX[(b & 15) as usize]);
            } else {
                self.byte(b);
            }
            i += 1;
        }
        self.byte(b'"');
    }

    const fn number(&mut self, n: u32) {
        let mut digits = [0u8; 10];
        let mut count = 0;
        let mut n = n;
        loop {
            digits[count] = b'0' + (n % 10) as u8;
            count += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        while count > 0 {
            count -= 1;
            self.byte(digits[count]);
        }
    }

    const fn list(&mut self, items: &[&str]) {
        self.byte(b'[');
        let mut i = 0;
        while i < items.len() {
            if i > 0 {
                self.byte(b',');
            }
            self.string(items[i]);
            i += 1;
        }
        self.byte(b']');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_manifest_parses_back_with_escapes_intact() {
        const BYTES: [u8; MANIFEST_CAPACITY] = build_manifest(&ManifestParts {
            name: "neg",
            version: "1.2.3",
            description: "y = \"-x\" \\ with a\ttab",
            layer_api: "1.0.0",
            abi: (1, 12),
            offers: &["flops", "prepare"],
            needs: &[],
            abi_stable: "0.11",
            panic_abort: false,
        });
        let m = Manifest::parse(&BYTES).unwrap();
        assert_eq!(m.name, "neg");
        assert_eq!(m.version, "1.2.3");
        assert_eq!(m.description, "y = \"-x\" \\ with a\ttab");
        assert_eq!(m.abi, (1, 12));
        assert_eq!(m.offers, ["flops", "prepare"]);
        assert!(m.needs.is_empty());
        assert_eq!(m.panic, "unwind");
    }

    #[test]
    fn unknown_fields_are_ignored_and_bad_bytes_refused() {
        let mut bytes = MANIFEST_MAGIC.to_vec();
        bytes.extend_from_slice(
            br#"{"name":"a","version":"1","abi":[1,9],"panic":"abort","later":{"x":1}}"#,
        );
        bytes.extend_from_slice(&[0; 16]);
        let m = Manifest::parse(&bytes).unwrap();
        assert_eq!((m.abi, m.panic.as_str()), ((1, 9), "abort"));
        assert!(Manifest::parse(b"NOTMAGIC{}")
            .unwrap_err()
            .contains("magic"));
        let mut bad = MANIFEST_MAGIC.to_vec();
        bad.extend_from_slice(b"{\"name\":1}\0");
        assert!(Manifest::parse(&bad).unwrap_err().contains("not valid"));
    }
}
