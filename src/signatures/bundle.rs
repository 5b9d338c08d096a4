//! Signature bundles: a signature directory (its `*.toml` files and
//! `VERSION`) packed as a gzip-compressed tar, with a detached Ed25519
//! signature in minisign's format beside it (`B` and `B.sig`).
//!
//! This module owns the format: packing a directory (deterministically, so
//! the same directory gives the same bytes), unpacking a bundle into memory
//! under hard limits (no path but a plain file name, no link, no device, no
//! oversized file or archive), comparing `VERSION`s, and making, reading and
//! checking keys and signatures. It reads files to pack but writes none and
//! opens no socket: fetching, installing and reloading are `crate::update`'s.
//!
//! Keys and signatures are minisign's, so the `minisign` tool can check a
//! bundle (`minisign -Vm B -p signing.pub`) and sign one with its own key.
use std::cmp::Ordering;
use std::io::Read;
use std::path::Path;

/// Largest bundle accepted, compressed.
pub const MAX_BUNDLE_BYTES: usize = 16 << 20;
/// Largest signature file accepted (a minisign signature is ~300 bytes).
pub const MAX_SIGNATURE_BYTES: usize = 4096;
/// Largest total a bundle may unpack to.
pub const MAX_UNPACKED_BYTES: u64 = 64 << 20;
/// Largest single file in a bundle.
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// Most files in a bundle.
pub const MAX_FILES: usize = 4096;
/// Longest `VERSION`.
pub const MAX_VERSION_LEN: usize = 64;

/// One file of a bundle: a plain name (`whatsapp.toml`, `VERSION`) and its
/// bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleFile {
    pub name: String,
    pub data: Vec<u8>,
}

/// Is `name` a file a signature directory may hold: `VERSION`, or
/// `<stem>.toml` with a stem of letters, digits, `-` and `_` (no dot
/// file, no separator, no `..`)?
pub fn is_bundle_name(name: &str) -> bool {
    if name == "VERSION" {
        return true;
    }
    match name.strip_suffix(".toml") {
        Some(stem) => {
            !stem.is_empty()
                && stem.len() <= 128
                && stem
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        }
        None => false,
    }
}

/// The files a signature directory contributes to a bundle: `VERSION` and
/// every `*.toml`, sorted by name. Other files are left out.
pub fn read_set(dir: &Path) -> Result<Vec<BundleFile>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !is_bundle_name(&name) {
            continue;
        }
        let path = entry.path();
        let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            continue;
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(format!(
                "{}: larger than {MAX_FILE_BYTES} bytes",
                path.display()
            ));
        }
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        files.push(BundleFile { name, data });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    check_set(&files)?;
    Ok(files)
}

/// A set has a valid `VERSION` and at least one `*.toml`.
fn check_set(files: &[BundleFile]) -> Result<(), String> {
    let version = files
        .iter()
        .find(|f| f.name == "VERSION")
        .ok_or("no VERSION file")?;
    Version::parse(&String::from_utf8_lossy(&version.data))?;
    if !files.iter().any(|f| f.name.ends_with(".toml")) {
        return Err("no *.toml signature file".into());
    }
    if files.len() > MAX_FILES {
        return Err(format!("more than {MAX_FILES} files"));
    }
    Ok(())
}

/// The `VERSION` of a set of files.
pub fn version_of(files: &[BundleFile]) -> Result<Version, String> {
    let v = files
        .iter()
        .find(|f| f.name == "VERSION")
        .ok_or("no VERSION file")?;
    Version::parse(&String::from_utf8_lossy(&v.data))
}

/// Pack files into a bundle: a tar of plain files (mode 0644, owner 0,
/// time 0, in the given order) compressed with gzip. The same files give
/// the same bytes.
pub fn pack(files: &[BundleFile]) -> Result<Vec<u8>, String> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for f in files {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(f.data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, &f.name, f.data.as_slice())
            .map_err(|e| format!("{}: {e}", f.name))?;
    }
    let gz = tar.into_inner().map_err(|e| e.to_string())?;
    gz.finish().map_err(|e| e.to_string())
}

/// Unpack a bundle into memory. Refused: anything but plain files at the
/// top (a `./` directory entry is tolerated), names other than `VERSION`
/// and `*.toml`, absolute paths, `..`, links, devices, a file over
/// [`MAX_FILE_BYTES`], more than [`MAX_FILES`] files, more than
/// [`MAX_UNPACKED_BYTES`] in all, a name twice, no `VERSION` or no
/// `*.toml`.
pub fn unpack(bundle: &[u8]) -> Result<Vec<BundleFile>, String> {
    if bundle.len() > MAX_BUNDLE_BYTES {
        return Err(format!(
            "the bundle is larger than {MAX_BUNDLE_BYTES} bytes"
        ));
    }
    // Decompress whole first, under the limit: tar then reads a slice.
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(bundle)
        .take(MAX_UNPACKED_BYTES + 1)
        .read_to_end(&mut tar_bytes)
        .map_err(|e| format!("not a gzip-compressed bundle: {e}"))?;
    if tar_bytes.len() as u64 > MAX_UNPACKED_BYTES {
        return Err(format!(
            "the bundle unpacks to more than {MAX_UNPACKED_BYTES} bytes"
        ));
    }
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut files: Vec<BundleFile> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("a damaged tar entry: {e}"))?;
        let raw = entry
            .path()
            .map_err(|e| format!("an entry without a readable path: {e}"))?
            .to_string_lossy()
            .to_string();
        let kind = entry.header().entry_type();
        let name = raw.strip_prefix("./").unwrap_or(&raw);
        if kind.is_dir() && (name.is_empty() || name == ".") {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(format!(
                "`{raw}`: only plain files may be in a bundle (this is a {kind:?})"
            ));
        }
        if !is_bundle_name(name) {
            return Err(format!(
                "`{raw}`: a bundle holds VERSION and <name>.toml files at its top only"
            ));
        }
        let size = entry.header().size().map_err(|e| format!("`{raw}`: {e}"))?;
        if size > MAX_FILE_BYTES {
            return Err(format!("`{raw}`: larger than {MAX_FILE_BYTES} bytes"));
        }
        if files.iter().any(|f| f.name == name) {
            return Err(format!("`{raw}`: in the bundle twice"));
        }
        if files.len() >= MAX_FILES {
            return Err(format!("more than {MAX_FILES} files"));
        }
        let mut data = Vec::new();
        (&mut entry)
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("`{raw}`: {e}"))?;
        if data.len() as u64 > MAX_FILE_BYTES {
            return Err(format!("`{raw}`: larger than {MAX_FILE_BYTES} bytes"));
        }
        files.push(BundleFile {
            name: name.to_string(),
            data,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    check_set(&files)?;
    Ok(files)
}

/// A signature set's `VERSION` (`2026.12.04`): dot-, dash- or
/// underscore-separated parts, compared part by part, numbers as numbers
/// (`2026.12.10` > `2026.12.9`), anything else as text, a missing part
/// lowest (`2026.12` < `2026.12.1`).
#[derive(Debug, Clone)]
pub struct Version {
    text: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    // Text sorts after numbers: 1.0 < 1.rc is not meaningful, but stable.
    Number(u64),
    Text(String),
}

impl Version {
    pub fn parse(text: &str) -> Result<Version, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("VERSION is empty".into());
        }
        if text.len() > MAX_VERSION_LEN
            || !text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(format!(
                "VERSION `{}` is not letters, digits and . - _ (at most {MAX_VERSION_LEN})",
                text.escape_default()
            ));
        }
        let parts = text
            .split(['.', '-', '_'])
            .map(|p| match p.parse::<u64>() {
                Ok(n) if !p.is_empty() => Part::Number(n),
                _ => Part::Text(p.to_ascii_lowercase()),
            })
            .collect();
        Ok(Version {
            text: text.to_string(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Version) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Version) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Version) -> Ordering {
        self.parts.cmp(&other.parts)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A new key pair as the texts of `signing.key` (unencrypted, keep it
/// 0600) and `signing.pub`, in minisign's formats.
pub fn keygen() -> Result<(String, String), String> {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().map_err(|e| e.to_string())?;
    let sk = kp
        .sk
        .to_box(Some("chatwall signature bundle signing key"))
        .map_err(|e| e.to_string())?;
    let pk = kp.pk.to_box().map_err(|e| e.to_string())?;
    Ok((sk.to_string(), pk.to_string()))
}

/// The public key of a `signing.pub` text (two lines, as minisign writes
/// it) or of its bare base64 line (`RW...`).
pub fn parse_public_key(text: &str) -> Result<minisign::PublicKey, String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let key = match lines.as_slice() {
        [one] => *one,
        [comment, key] if comment.starts_with("untrusted comment:") => *key,
        _ => return Err("not a minisign public key (`untrusted comment:` and one base64 line, or the base64 line alone)".into()),
    };
    minisign::PublicKey::from_base64(key).map_err(|e| format!("not a minisign public key: {e}"))
}

/// Sign `data` with the secret key text of `signing.key` (unencrypted);
/// `trusted` goes into the signed trusted comment. The text of `B.sig`.
pub fn sign(secret_key: &str, data: &[u8], trusted: &str) -> Result<String, String> {
    let sk_box = minisign::SecretKeyBox::from_string(secret_key).map_err(|e| e.to_string())?;
    let sk = sk_box.into_unencrypted_secret_key().map_err(|e| {
        format!("not an unencrypted minisign secret key ({e}); sign a bundle made by an encrypted key with the minisign tool")
    })?;
    let pk = minisign::PublicKey::from_secret_key(&sk).map_err(|e| e.to_string())?;
    let sig = minisign::sign(
        Some(&pk),
        &sk,
        std::io::Cursor::new(data),
        Some(trusted),
        Some("chatwall signature bundle"),
    )
    .map_err(|e| e.to_string())?;
    Ok(sig.into_string())
}

/// Check the signature text of `B.sig` over `data` with a public key.
/// Only prehashed (current minisign) signatures are accepted.
pub fn verify(
    public_key: &minisign::PublicKey,
    data: &[u8],
    signature: &str,
) -> Result<(), String> {
    let sig = minisign::SignatureBox::from_string(signature)
        .map_err(|e| format!("not a minisign signature: {e}"))?;
    minisign::verify(
        public_key,
        &sig,
        std::io::Cursor::new(data),
        true,
        false,
        false,
    )
    .map_err(|e| format!("bad signature: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, data: &str) -> BundleFile {
        BundleFile {
            name: name.into(),
            data: data.as_bytes().to_vec(),
        }
    }

    fn set() -> Vec<BundleFile> {
        vec![
            file("VERSION", "2027.01.01\n"),
            file("a.toml", "id = \"a\"\n"),
        ]
    }

    /// A tar.gz of raw entries, for bundles `pack` would never make.
    fn raw_bundle(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        build(&mut tar);
        let bytes = tar.into_inner().expect("tar");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &bytes).expect("gz");
        gz.finish().expect("gz")
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    /// A raw ustar header with `name` written as is (the tar crate's
    /// builder refuses `..` and absolute paths itself).
    fn append_raw(tar: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = header(tar::EntryType::Regular, data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        tar.append(&h, data).expect("append");
    }

    #[test]
    fn pack_and_unpack_round_trip_and_are_deterministic() {
        let b = pack(&set()).expect("pack");
        assert_eq!(b, pack(&set()).expect("pack again"));
        assert_eq!(unpack(&b).expect("unpack"), set());
    }

    #[test]
    fn unsafe_or_odd_entries_are_refused() {
        let ok = |t: &mut tar::Builder<Vec<u8>>| {
            append_raw(t, "VERSION", b"1\n");
            append_raw(t, "a.toml", b"x");
        };
        assert!(unpack(&raw_bundle(ok)).is_ok());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "..",
                raw_bundle(|t| {
                    ok(t);
                    append_raw(t, "../evil.toml", b"x");
                }),
            ),
            (
                "absolute",
                raw_bundle(|t| {
                    ok(t);
                    append_raw(t, "/etc/evil.toml", b"x");
                }),
            ),
            (
                "subdirectory",
                raw_bundle(|t| {
                    ok(t);
                    append_raw(t, "sub/b.toml", b"x");
                }),
            ),
            (
                "other file",
                raw_bundle(|t| {
                    ok(t);
                    append_raw(t, "run.sh", b"x");
                }),
            ),
            (
                "symlink",
                raw_bundle(|t| {
                    ok(t);
                    let mut h = header(tar::EntryType::Symlink, 0);
                    h.set_link_name("/etc/passwd").expect("link");
                    t.append_data(&mut h, "b.toml", std::io::empty())
                        .expect("link");
                }),
            ),
            (
                "hard link",
                raw_bundle(|t| {
                    ok(t);
                    let mut h = header(tar::EntryType::Link, 0);
                    h.set_link_name("a.toml").expect("link");
                    t.append_data(&mut h, "b.toml", std::io::empty())
                        .expect("link");
                }),
            ),
            (
                "twice",
                raw_bundle(|t| {
                    ok(t);
                    append_raw(t, "a.toml", b"y");
                }),
            ),
            ("no VERSION", raw_bundle(|t| append_raw(t, "a.toml", b"x"))),
            ("no toml", raw_bundle(|t| append_raw(t, "VERSION", b"1"))),
            (
                "bad VERSION",
                raw_bundle(|t| {
                    append_raw(t, "VERSION", b"1 2; rm");
                    append_raw(t, "a.toml", b"x");
                }),
            ),
            ("not gzip", b"VERSION 1".to_vec()),
        ];
        for (what, bytes) in cases {
            assert!(unpack(&bytes).is_err(), "{what} was accepted");
        }
        // A ./ directory entry (GNU tar -C dir .) is tolerated.
        let dotted = raw_bundle(|t| {
            let mut h = header(tar::EntryType::Directory, 0);
            h.set_path("./").expect("path");
            h.set_cksum();
            t.append(&h, std::io::empty()).expect("dir");
            append_raw(t, "./VERSION", b"1\n");
            append_raw(t, "./a.toml", b"x");
        });
        let files = unpack(&dotted).expect("./ entries");
        assert_eq!(files.len(), 2);
    }

    #[test]
    fn oversized_bundles_and_files_are_refused() {
        let big = vec![b'#'; MAX_FILE_BYTES as usize + 1];
        let b = raw_bundle(|t| {
            append_raw(t, "VERSION", b"1");
            append_raw(t, "a.toml", &big);
        });
        assert!(unpack(&b).expect_err("big file").contains("larger"));
        // A bomb: many files that together unpack past the limit.
        let chunk = vec![b'#'; MAX_FILE_BYTES as usize];
        let n = (MAX_UNPACKED_BYTES / MAX_FILE_BYTES) as usize + 1;
        let b = raw_bundle(|t| {
            append_raw(t, "VERSION", b"1");
            for i in 0..n {
                append_raw(t, &format!("f{i}.toml"), &chunk);
            }
        });
        assert!(b.len() < MAX_BUNDLE_BYTES, "the bomb is small compressed");
        assert!(unpack(&b).expect_err("bomb").contains("more than"));
        assert!(unpack(&vec![0u8; MAX_BUNDLE_BYTES + 1]).is_err());
    }

    #[test]
    fn versions_compare_part_by_part() {
        let v = |s: &str| Version::parse(s).expect(s);
        assert!(v("2026.12.04") < v("2026.12.05"));
        assert!(v("2026.12.9") < v("2026.12.10"));
        assert!(v("2026.12") < v("2026.12.1"));
        assert!(v("2027.01.01") > v("2026.12.31"));
        assert_eq!(v("2026.12.04"), v("2026.12.4"));
        assert_eq!(v(" 2026.12.04\n"), v("2026.12.04"));
        for bad in ["", "  ", "1 2", "1/2", "a;b", &"9".repeat(65)] {
            assert!(Version::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn signatures_verify_only_with_the_right_key_and_bytes() {
        let (sk, pk) = keygen().expect("keygen");
        let (_, other) = keygen().expect("keygen");
        let pk = parse_public_key(&pk).expect("pub");
        let other = parse_public_key(&other).expect("pub");
        let data = pack(&set()).expect("pack");
        let sig = sign(&sk, &data, "version:2027.01.01").expect("sign");
        assert!(verify(&pk, &data, &sig).is_ok());
        assert!(verify(&other, &data, &sig).is_err(), "another key");
        let mut tampered = data.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(verify(&pk, &tampered, &sig).is_err(), "tampered bytes");
        assert!(verify(&pk, &data, "not a signature").is_err());
        // The bare base64 line is a key too.
        let line = pk.to_base64();
        assert!(parse_public_key(&line).is_ok());
        assert!(parse_public_key("RWnotakey").is_err());
    }
}
