//! Signing and verifying bundles: who may publish a model, and whether its files are the ones signed.
//!
//! A bundle is trusted when its manifest carries an ed25519 signature, by a trusted key, over
//! [`BundleManifest::canonical_bytes`], and every file of the bundle matches the size and sha256 the
//! manifest records. The signature covers the digests, so checking both proves every byte.
//! Everything here is sans-IO: callers read the manifest, list the directory and open the files.
//!
//! A key is named by its key id, the hex of the first 8 bytes of the sha256 of its 32 public key
//! bytes (16 hex digits), which the signature records next to the signature itself.
//!
//! Key files are UTF-8 text: blank lines and lines starting with `#` are comments, and exactly one
//! line holds the key as a tag and 64 hex digits:
//! - public key (`NAME.pub`, given to devices): `ed25519-public <32-byte public key as hex>`;
//! - secret key (`NAME.key`, mode 0600, kept by whoever signs releases):
//!   `ed25519-secret <32-byte secret key (the RFC 8032 seed) as hex>`.
//!
//! The tags keep one from being used as the other: a secret key given where a public key belongs is
//! refused with advice instead of being silently mistaken for one.

use std::collections::BTreeSet;
use std::io::{self, Read};

use ed25519_dalek::{SIGNATURE_LENGTH, Signature, Signer};
use sha2::{Digest, Sha256};

pub use ed25519_dalek::{SigningKey, VerifyingKey};

use super::{BundleManifest, BundleSignature, FileDigest, MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE};

/// The tag of a public key line in a key file.
pub const PUBLIC_KEY_TAG: &str = "ed25519-public";
/// The tag of a secret key line in a key file.
pub const SECRET_KEY_TAG: &str = "ed25519-secret";
/// Files every bundle's manifest must list: the loader reads them.
pub const REQUIRED_FILES: [&str; 2] = [MODEL_FILE, TOKENIZER_FILE];

/// Bytes of the public key's sha256 that make up its key id.
const KEY_ID_BYTES: usize = 8;
/// Bytes of an ed25519 public or secret key.
const KEY_BYTES: usize = 32;

/// Why a manifest's signature is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("it is not signed; sign it with `tandem-train sign --key KEY --bundle DIR` using a trusted key")]
    Unsigned,
    #[error(
        "it is signed by key {key_id}, which is not trusted ({}); trust that key's .pub file if it \
         is yours, or sign the bundle again with a trusted key",
        describe_trusted(.trusted)
    )]
    UntrustedKey {
        /// The key id the signature names.
        key_id: String,
        /// The key ids that are trusted.
        trusted: Vec<String>,
    },
    #[error(
        "its signature by key {key_id} is malformed ({reason}); manifest.json was damaged or edited: \
         sign the bundle again"
    )]
    MalformedSignature { key_id: String, reason: String },
    #[error(
        "its signature by key {key_id} does not match its manifest: manifest.json was changed after \
         signing (or the signature was forged); never edit a signed manifest, export and sign again"
    )]
    BadSignature { key_id: String },
}

fn describe_trusted(trusted: &[String]) -> String {
    if trusted.is_empty() {
        "no key is trusted".to_string()
    } else {
        format!("trusted: {}", trusted.join(", "))
    }
}

/// Why a bundle's files do not match its manifest.
#[derive(Debug, thiserror::Error)]
pub enum FileCheckError {
    #[error(
        "its manifest does not list {file}, which every bundle needs; export the bundle again with \
         tandem-train"
    )]
    RequiredFileUnlisted { file: String },
    #[error(
        "its manifest lists `{file}`, which is not a plain file name inside the bundle; the manifest \
         is not one tandem-train wrote: export the bundle again"
    )]
    UnsafeName { file: String },
    #[error(
        "{file} is in the bundle directory but not in its manifest, so nothing vouches for it; remove \
         it (a bundle holds only the files its manifest lists) or export the bundle again"
    )]
    Unlisted { file: String },
    #[error("{file} is listed in its manifest but cannot be read ({cause}); copy the whole bundle again")]
    Unreadable { file: String, cause: io::Error },
    #[error(
        "{file} is {found} bytes but its manifest says {expected}: the file is truncated, corrupt or \
         was replaced; copy the bundle again from its source"
    )]
    SizeMismatch { file: String, expected: u64, found: u64 },
    #[error(
        "{file} has sha256 {found} but its manifest says {expected}: the file is corrupt or was \
         altered; copy the bundle again from its source"
    )]
    DigestMismatch { file: String, expected: String, found: String },
}

/// Why a bundle is refused: its signature, or its files.
#[derive(Debug, thiserror::Error)]
pub enum BundleVerifyError {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Files(#[from] FileCheckError),
}

/// Why a key file was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("it holds no key: expected a line `{expected} <64 hex digits>`")]
    Empty { expected: &'static str },
    #[error("it holds more than one key line; keep one key per file")]
    SeveralKeys,
    #[error(
        "it holds a secret signing key, not a public key: give the matching .pub file (tandem-train \
         keygen wrote both) and keep the secret key off the devices"
    )]
    SecretKeyInsteadOfPublic,
    #[error(
        "it holds a public key, but signing needs the secret key: give the .key file tandem-train \
         keygen wrote next to this .pub"
    )]
    PublicKeyInsteadOfSecret,
    #[error("its key line starts with `{found}`; expected `{expected} <64 hex digits>`")]
    UnknownTag { found: String, expected: &'static str },
    #[error("the key is not hex ({reason}); expected 64 hex digits after `{tag}`")]
    NotHex { tag: &'static str, reason: String },
    #[error("the key is {found} bytes; an ed25519 key is 32 bytes (64 hex digits)")]
    WrongLength { found: usize },
    #[error("the key is not a usable ed25519 public key ({reason}); generate one with tandem-train keygen")]
    InvalidPublicKey { reason: String },
}

/// The key id of `key`: hex of the first 8 bytes of the sha256 of its public key bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..KEY_ID_BYTES])
}

/// Signs `manifest` with `key`, replacing any signature it had.
pub fn sign_manifest(manifest: &mut BundleManifest, key: &SigningKey) {
    let signature = key.sign(&manifest.canonical_bytes());
    manifest.signature = Some(BundleSignature {
        key_id: key_id(&key.verifying_key()),
        ed25519: hex::encode(signature.to_bytes()),
    });
}

/// Checks that `manifest` is signed by one of `trusted` and that the signature covers exactly its
/// canonical bytes; returns the key that signed it. Says nothing about the files: see
/// [`verify_files`].
pub fn verify_manifest<'k>(
    manifest: &BundleManifest,
    trusted: &'k [VerifyingKey],
) -> Result<&'k VerifyingKey, SignatureError> {
    let signed = manifest.signature.as_ref().ok_or(SignatureError::Unsigned)?;
    let key = trusted.iter().find(|key| key_id(key) == signed.key_id).ok_or_else(|| {
        SignatureError::UntrustedKey {
            key_id: signed.key_id.clone(),
            trusted: trusted.iter().map(key_id).collect(),
        }
    })?;
    let malformed =
        |reason: String| SignatureError::MalformedSignature { key_id: signed.key_id.clone(), reason };
    let bytes = hex::decode(&signed.ed25519).map_err(|e| malformed(e.to_string()))?;
    let bytes: [u8; SIGNATURE_LENGTH] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| malformed(format!("{} bytes instead of {SIGNATURE_LENGTH}", b.len())))?;
    key.verify_strict(&manifest.canonical_bytes(), &Signature::from_bytes(&bytes))
        .map_err(|_| SignatureError::BadSignature { key_id: signed.key_id.clone() })?;
    Ok(key)
}

/// Checks that the manifest lists every file a bundle needs ([`REQUIRED_FILES`]), only plain file
/// names, and that each listed file, as `open` yields it, has the recorded size and sha256.
pub fn verify_files<R: Read>(
    manifest: &BundleManifest,
    open: impl Fn(&str) -> io::Result<R>,
) -> Result<(), FileCheckError> {
    if let Some(file) = REQUIRED_FILES.iter().find(|f| !manifest.files.contains_key(**f)) {
        return Err(FileCheckError::RequiredFileUnlisted { file: file.to_string() });
    }
    if let Some(file) = manifest.files.keys().find(|name| !is_plain_file_name(name)) {
        return Err(FileCheckError::UnsafeName { file: file.clone() });
    }
    for (file, expected) in &manifest.files {
        let unreadable = |cause| FileCheckError::Unreadable { file: file.clone(), cause };
        let found = open(file).and_then(FileDigest::of_reader).map_err(unreadable)?;
        if found.size != expected.size {
            return Err(FileCheckError::SizeMismatch {
                file: file.clone(),
                expected: expected.size,
                found: found.size,
            });
        }
        if !found.sha256.eq_ignore_ascii_case(&expected.sha256) {
            return Err(FileCheckError::DigestMismatch {
                file: file.clone(),
                expected: expected.sha256.clone(),
                found: found.sha256,
            });
        }
    }
    Ok(())
}

/// Checks that every entry of the bundle directory (`present`, by name) other than the manifest is
/// listed in the manifest: the loader reads some files only when they exist (a tokenizer, a chat
/// template), so an unlisted one could change what a verified bundle does.
pub fn check_listed<'a>(
    manifest: &BundleManifest,
    present: impl IntoIterator<Item = &'a str>,
) -> Result<(), FileCheckError> {
    let unlisted: BTreeSet<&str> =
        present.into_iter().filter(|n| *n != MANIFEST_FILE && !manifest.files.contains_key(*n)).collect();
    match unlisted.first() {
        Some(file) => Err(FileCheckError::Unlisted { file: file.to_string() }),
        None => Ok(()),
    }
}

/// Everything checked before a bundle is trusted, cheapest first: the signature by one of
/// `trusted` ([`verify_manifest`]), that the directory's entries (`present`) are all listed
/// ([`check_listed`]), then every file's size and digest ([`verify_files`]). Returns the signing key.
pub fn verify_bundle<'k, 'a, R: Read>(
    manifest: &BundleManifest,
    trusted: &'k [VerifyingKey],
    present: impl IntoIterator<Item = &'a str>,
    open: impl Fn(&str) -> io::Result<R>,
) -> Result<&'k VerifyingKey, BundleVerifyError> {
    let key = verify_manifest(manifest, trusted)?;
    check_listed(manifest, present)?;
    verify_files(manifest, open)?;
    Ok(key)
}

/// A name that stays inside the bundle directory and is not the manifest.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name != MANIFEST_FILE
        && !name.contains(['/', '\\', '\0'])
}

/// The text of a `NAME.pub` file for `key`.
pub fn public_key_file(key: &VerifyingKey) -> String {
    format!(
        "# Tandem bundle verification key (ed25519), key id {id}.\n\
         # Devices that trust it load bundles signed with the matching secret key.\n\
         {PUBLIC_KEY_TAG} {hex}\n",
        id = key_id(key),
        hex = hex::encode(key.as_bytes())
    )
}

/// The text of a `NAME.key` file for `key`. Keep it secret (mode 0600).
pub fn secret_key_file(key: &SigningKey) -> String {
    format!(
        "# Tandem bundle signing key (ed25519), key id {id}. Keep it secret: whoever holds it can\n\
         # sign models that every device trusting {id} will load.\n\
         {SECRET_KEY_TAG} {hex}\n",
        id = key_id(&key.verifying_key()),
        hex = hex::encode(key.as_bytes())
    )
}

/// Reads a public key from the text of a `.pub` file.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyFormatError> {
    let bytes = key_line(text, PUBLIC_KEY_TAG)?;
    let key = VerifyingKey::from_bytes(&bytes)
        .map_err(|e| KeyFormatError::InvalidPublicKey { reason: e.to_string() })?;
    if key.is_weak() {
        return Err(KeyFormatError::InvalidPublicKey { reason: "a weak (small-order) point".into() });
    }
    Ok(key)
}

/// Reads a secret key from the text of a `.key` file.
pub fn parse_secret_key(text: &str) -> Result<SigningKey, KeyFormatError> {
    key_line(text, SECRET_KEY_TAG).map(|bytes| SigningKey::from_bytes(&bytes))
}

/// The 32 bytes of the one key line tagged `tag`.
fn key_line(text: &str, tag: &'static str) -> Result<[u8; KEY_BYTES], KeyFormatError> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    let line = lines.next().ok_or(KeyFormatError::Empty { expected: tag })?;
    if lines.next().is_some() {
        return Err(KeyFormatError::SeveralKeys);
    }
    let (found, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    if found != tag {
        return Err(match found {
            SECRET_KEY_TAG => KeyFormatError::SecretKeyInsteadOfPublic,
            PUBLIC_KEY_TAG => KeyFormatError::PublicKeyInsteadOfSecret,
            _ => KeyFormatError::UnknownTag { found: found.chars().take(32).collect(), expected: tag },
        });
    }
    let bytes =
        hex::decode(value.trim()).map_err(|e| KeyFormatError::NotHex { tag, reason: e.to_string() })?;
    bytes.try_into().map_err(|b: Vec<u8>| KeyFormatError::WrongLength { found: b.len() })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::bundle::{BUNDLE_FORMAT_VERSION, DecoderIo, ModelArchitecture, Provenance};

    const MODEL: &[u8] = b"onnx graph bytes";
    const TOKENIZER: &[u8] = b"{\"model\": {}}";

    fn test_key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; KEY_BYTES])
    }

    fn files() -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([
            (MODEL_FILE.to_string(), MODEL.to_vec()),
            (TOKENIZER_FILE.to_string(), TOKENIZER.to_vec()),
        ])
    }

    fn manifest() -> BundleManifest {
        BundleManifest {
            format: BUNDLE_FORMAT_VERSION,
            name: "tiny".into(),
            version: "3".into(),
            architecture: ModelArchitecture {
                model_type: "qwen2".into(),
                vocab_size: 512,
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 16,
                context_length: 256,
                tie_word_embeddings: true,
            },
            chat_template: None,
            help_marker: crate::help_marker::HELP_MARKER.into(),
            eos_token_ids: vec![2],
            io: DecoderIo { position_ids: true, kv_dtype: "float32".into(), opset: 17 },
            files: files().iter().map(|(name, bytes)| (name.clone(), FileDigest::of_bytes(bytes))).collect(),
            provenance: Provenance::default(),
            evaluation: BTreeMap::from([("accuracy".to_string(), 0.25)]),
            signature: None,
        }
    }

    fn signed(key: &SigningKey) -> BundleManifest {
        let mut m = manifest();
        sign_manifest(&mut m, key);
        m
    }

    fn opener(files: BTreeMap<String, Vec<u8>>) -> impl Fn(&str) -> io::Result<io::Cursor<Vec<u8>>> {
        move |name| {
            files
                .get(name)
                .cloned()
                .map(io::Cursor::new)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
        }
    }

    #[test]
    fn a_signed_manifest_verifies_against_its_key_and_survives_json() {
        let key = test_key(1);
        let m = signed(&key);
        let trusted = [test_key(9).verifying_key(), key.verifying_key()];
        assert_eq!(verify_manifest(&m, &trusted).unwrap(), &key.verifying_key());
        let reread = BundleManifest::from_json(&m.to_json_pretty()).unwrap();
        assert_eq!(verify_manifest(&reread, &trusted).unwrap(), &key.verifying_key());
        assert_eq!(m.signature.as_ref().unwrap().key_id, key_id(&key.verifying_key()));
    }

    #[test]
    fn key_id_is_the_first_eight_bytes_of_the_public_key_sha256() {
        let public = test_key(1).verifying_key();
        let id = key_id(&public);
        assert_eq!(id.len(), 16);
        assert_eq!(id, hex::encode(&Sha256::digest(public.as_bytes())[..8]));
        assert_ne!(id, key_id(&test_key(2).verifying_key()));
    }

    #[test]
    fn an_unsigned_manifest_is_refused() {
        let err = verify_manifest(&manifest(), &[test_key(1).verifying_key()]).unwrap_err();
        assert_eq!(err, SignatureError::Unsigned);
        assert!(err.to_string().contains("tandem-train sign"), "{err}");
    }

    #[test]
    fn a_manifest_signed_by_an_untrusted_key_is_refused_naming_both_keys() {
        let m = signed(&test_key(1));
        let trusted = [test_key(2).verifying_key()];
        let err = verify_manifest(&m, &trusted).unwrap_err();
        assert!(matches!(&err, SignatureError::UntrustedKey { key_id: id, .. }
                if *id == key_id(&test_key(1).verifying_key())));
        let text = err.to_string();
        assert!(text.contains(&key_id(&test_key(1).verifying_key())), "{text}");
        assert!(text.contains(&key_id(&test_key(2).verifying_key())), "{text}");
        assert!(verify_manifest(&m, &[]).unwrap_err().to_string().contains("no key is trusted"));
    }

    #[test]
    fn changing_any_signed_field_breaks_the_signature() {
        let key = test_key(1);
        let trusted = [key.verifying_key()];
        let tampered: [fn(&mut BundleManifest); 4] = [
            |m| m.version = "4".into(),
            |m| m.eos_token_ids.push(7),
            |m| m.files.get_mut(MODEL_FILE).unwrap().sha256 = "00".repeat(32),
            |m| {
                m.evaluation.insert("accuracy".into(), 0.99);
            },
        ];
        for change in tampered {
            let mut m = signed(&key);
            change(&mut m);
            let err = verify_manifest(&m, &trusted).unwrap_err();
            assert!(matches!(err, SignatureError::BadSignature { .. }), "{err}");
        }
    }

    #[test]
    fn a_key_id_swapped_onto_another_keys_signature_is_refused() {
        let mut m = signed(&test_key(2));
        m.signature.as_mut().unwrap().key_id = key_id(&test_key(1).verifying_key());
        let err = verify_manifest(&m, &[test_key(1).verifying_key()]).unwrap_err();
        assert!(matches!(err, SignatureError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn a_garbled_signature_is_reported_as_malformed() {
        let key = test_key(1);
        let mut m = signed(&key);
        m.signature.as_mut().unwrap().ed25519 = "abcd".into();
        let err = verify_manifest(&m, &[key.verifying_key()]).unwrap_err();
        assert!(
            matches!(&err, SignatureError::MalformedSignature { reason, .. } if reason.contains("2 bytes"))
        );
        m.signature.as_mut().unwrap().ed25519 = "zz".into();
        let err = verify_manifest(&m, &[key.verifying_key()]).unwrap_err();
        assert!(matches!(err, SignatureError::MalformedSignature { .. }), "{err}");
    }

    #[test]
    fn files_matching_the_manifest_pass() {
        verify_files(&manifest(), opener(files())).unwrap();
    }

    #[test]
    fn a_flipped_byte_in_model_onnx_fails_the_digest_check() {
        let mut files = files();
        files.get_mut(MODEL_FILE).unwrap()[3] ^= 0x01;
        let err = verify_files(&manifest(), opener(files)).unwrap_err();
        assert!(matches!(&err, FileCheckError::DigestMismatch { file, .. } if file == MODEL_FILE), "{err}");
        assert!(err.to_string().contains("copy the bundle again"), "{err}");
    }

    #[test]
    fn a_truncated_file_fails_the_size_check() {
        let mut files = files();
        files.get_mut(TOKENIZER_FILE).unwrap().pop();
        let err = verify_files(&manifest(), opener(files)).unwrap_err();
        assert!(
            matches!(&err, FileCheckError::SizeMismatch { file, expected, found }
                if file == TOKENIZER_FILE && *found + 1 == *expected),
            "{err}"
        );
    }

    #[test]
    fn a_missing_listed_file_is_reported_as_unreadable() {
        let mut files = files();
        files.remove(TOKENIZER_FILE);
        let err = verify_files(&manifest(), opener(files)).unwrap_err();
        assert!(matches!(&err, FileCheckError::Unreadable { file, .. } if file == TOKENIZER_FILE), "{err}");
    }

    #[test]
    fn a_manifest_without_the_graph_is_refused_before_reading_anything() {
        let mut m = manifest();
        m.files.remove(MODEL_FILE);
        let err = verify_files(&m, |_| -> io::Result<&[u8]> { panic!("nothing may be read") }).unwrap_err();
        assert!(matches!(&err, FileCheckError::RequiredFileUnlisted { file } if file == MODEL_FILE), "{err}");
    }

    #[test]
    fn file_names_leaving_the_bundle_are_refused() {
        for name in ["../secret", "sub/model.bin", "..", "", MANIFEST_FILE] {
            let mut m = manifest();
            m.files.insert(name.to_string(), FileDigest::of_bytes(b""));
            let err = verify_files(&m, opener(files())).unwrap_err();
            assert!(matches!(&err, FileCheckError::UnsafeName { file } if file == name), "{name}: {err}");
        }
    }

    #[test]
    fn files_the_manifest_does_not_list_are_refused() {
        let m = manifest();
        check_listed(&m, [MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE]).unwrap();
        let err = check_listed(&m, [MODEL_FILE, "chat_template.jinja", TOKENIZER_FILE]).unwrap_err();
        assert!(matches!(&err, FileCheckError::Unlisted { file } if file == "chat_template.jinja"), "{err}");
    }

    #[test]
    fn verify_bundle_checks_the_signature_before_reading_any_file() {
        let m = manifest();
        let err = verify_bundle(&m, &[test_key(1).verifying_key()], [MODEL_FILE], |_| -> io::Result<&[u8]> {
            panic!("an unsigned bundle's files are never read")
        })
        .unwrap_err();
        assert!(matches!(err, BundleVerifyError::Signature(SignatureError::Unsigned)), "{err}");
    }

    #[test]
    fn verify_bundle_accepts_a_signed_intact_bundle_and_refuses_a_tampered_one() {
        let key = test_key(1);
        let m = signed(&key);
        let trusted = [key.verifying_key()];
        let names = files().into_keys().collect::<Vec<_>>();
        let present = || names.iter().map(String::as_str);
        assert_eq!(verify_bundle(&m, &trusted, present(), opener(files())).unwrap(), &trusted[0]);
        let mut tampered = files();
        tampered.get_mut(MODEL_FILE).unwrap()[0] ^= 0x80;
        let err = verify_bundle(&m, &trusted, present(), opener(tampered)).unwrap_err();
        assert!(matches!(err, BundleVerifyError::Files(FileCheckError::DigestMismatch { .. })), "{err}");
    }

    #[test]
    fn key_files_round_trip() {
        let secret = test_key(7);
        assert_eq!(parse_secret_key(&secret_key_file(&secret)).unwrap().to_bytes(), secret.to_bytes());
        let public = secret.verifying_key();
        let text = public_key_file(&public);
        assert_eq!(parse_public_key(&text).unwrap(), public);
        assert!(text.contains(&key_id(&public)), "the .pub file names its key id: {text}");
    }

    #[test]
    fn a_bare_key_line_without_comments_is_enough() {
        let public = test_key(7).verifying_key();
        let line = format!("  {PUBLIC_KEY_TAG}   {}  \n\n", hex::encode(public.as_bytes()));
        assert_eq!(parse_public_key(&line).unwrap(), public);
    }

    #[test]
    fn a_secret_key_given_as_a_public_key_is_refused_with_advice() {
        let err = parse_public_key(&secret_key_file(&test_key(7))).unwrap_err();
        assert_eq!(err, KeyFormatError::SecretKeyInsteadOfPublic);
        assert!(err.to_string().contains(".pub"), "{err}");
        let err = parse_secret_key(&public_key_file(&test_key(7).verifying_key())).unwrap_err();
        assert_eq!(err, KeyFormatError::PublicKeyInsteadOfSecret);
    }

    #[test]
    fn malformed_key_files_are_refused_saying_why() {
        let hex64 = "ab".repeat(32);
        type Expected = fn(&KeyFormatError) -> bool;
        let cases: [(String, Expected); 7] = [
            (String::new(), |e| matches!(e, KeyFormatError::Empty { .. })),
            ("# only a comment\n".into(), |e| matches!(e, KeyFormatError::Empty { .. })),
            (format!("{PUBLIC_KEY_TAG} {}", "ab".repeat(31)), |e| {
                matches!(e, KeyFormatError::WrongLength { found: 31 })
            }),
            (format!("{PUBLIC_KEY_TAG} {}", "zz".repeat(32)), |e| matches!(e, KeyFormatError::NotHex { .. })),
            (PUBLIC_KEY_TAG.to_string(), |e| matches!(e, KeyFormatError::WrongLength { found: 0 })),
            (format!("ssh-ed25519 {hex64}"), |e| matches!(e, KeyFormatError::UnknownTag { .. })),
            (format!("{PUBLIC_KEY_TAG} {hex64}\n{PUBLIC_KEY_TAG} {hex64}"), |e| {
                matches!(e, KeyFormatError::SeveralKeys)
            }),
        ];
        for (text, expected) in cases {
            let err = parse_public_key(&text).unwrap_err();
            assert!(expected(&err), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn a_small_order_public_key_is_refused() {
        // The identity point: every signature "verifies" under it with the lax check.
        let identity = format!("{PUBLIC_KEY_TAG} 01{}", "00".repeat(31));
        let err = parse_public_key(&identity).unwrap_err();
        assert!(matches!(err, KeyFormatError::InvalidPublicKey { .. }), "{err}");
    }
}
