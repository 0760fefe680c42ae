use super::*;

const TEST_COSTS: Argon2Costs = Argon2Costs {
    memory_kib: 64,
    iterations: 1,
};

fn passphrase(text: &str) -> KeySource {
    KeySource::Passphrase(text.as_bytes().to_vec())
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = image_format::scratch::path("crypt", name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_sealed_frame_opens_to_its_bytes() {
    let keys = Keys::from_master(&[1; 32]);
    let sealed = keys.seal_frame(5, 3, b"hello").unwrap();
    assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
    assert!(!sealed.windows(5).any(|w| w == b"hello"));
    let opened = keys.open_frame("pack p", 0, 16, 5, 3, &sealed).unwrap();
    assert_eq!(opened, b"hello");
}

#[test]
fn two_seals_of_the_same_bytes_differ() {
    let keys = Keys::from_master(&[1; 32]);
    let a = keys.seal_frame(5, 3, b"hello").unwrap();
    let b = keys.seal_frame(5, 3, b"hello").unwrap();
    assert_ne!(a, b);
}

#[test]
fn a_flipped_bit_in_nonce_ciphertext_or_tag_fails_naming_pack_and_frame() {
    let keys = Keys::from_master(&[1; 32]);
    let sealed = keys.seal_frame(64, 2, &[0xab; 64]).unwrap();
    for at in [
        0,
        NONCE_LEN - 1,
        NONCE_LEN,
        NONCE_LEN + 40,
        sealed.len() - 1,
    ] {
        let mut bad = sealed.clone();
        bad[at] ^= 0x08;
        let err = keys
            .open_frame("pack abc", 7, 0x1234, 64, 2, &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pack abc"), "{err}");
        assert!(err.contains("frame 7"), "{err}");
        assert!(err.contains("authentication"), "{err}");
    }
}

#[test]
fn an_edited_header_fails_authentication() {
    let keys = Keys::from_master(&[1; 32]);
    let sealed = keys.seal_frame(64, 3, &[0xab; 64]).unwrap();
    assert!(keys.open_frame("p", 0, 0, 65, 3, &sealed).is_err());
    assert!(keys.open_frame("p", 0, 0, 64, 2, &sealed).is_err());
}

#[test]
fn another_key_cannot_open_a_frame() {
    let sealed = Keys::from_master(&[1; 32])
        .seal_frame(3, 2, b"abc")
        .unwrap();
    assert!(
        Keys::from_master(&[2; 32])
            .open_frame("p", 0, 0, 3, 2, &sealed)
            .is_err()
    );
}

#[test]
fn a_frame_shorter_than_nonce_and_tag_is_an_error() {
    let keys = Keys::from_master(&[1; 32]);
    let err = keys.open_frame("p", 2, 0, 3, 2, &[0; 39]).unwrap_err();
    assert!(err.to_string().contains("frame 2"), "{err}");
}

#[test]
fn keyed_ids_differ_from_plain_ones_and_between_keys() {
    let a = Keys::from_master(&[1; 32]).hasher();
    let b = Keys::from_master(&[2; 32]).hasher();
    assert_ne!(a.id(b"data"), IdHasher::Plain.id(b"data"));
    assert_ne!(a.id(b"data"), b.id(b"data"));
    assert_eq!(a.id(b"data"), a.id(b"data"));
    assert_eq!(IdHasher::Plain.id(b"data"), ChunkId::of(b"data"));
}

#[test]
fn subkeys_and_fingerprint_are_distinct() {
    let keys = Keys::from_master(&[9; 32]);
    let IdHasher::Keyed(id) = keys.hasher() else {
        panic!("not keyed")
    };
    assert_ne!(&id, keys.manifest_key());
    assert_ne!(&id, &[9; 32]);
    assert_eq!(keys.fingerprint().len(), 32);
    assert!(!keys.fingerprint().contains(&to_hex(&id[..16])));
}

#[test]
fn a_passphrase_unlocks_and_a_wrong_one_fails_fast() {
    let dir = std::path::Path::new("/stores/a");
    let (config, keys) = Keys::create(&passphrase("right"), TEST_COSTS).unwrap();
    let json = serde_json::to_string(&config).unwrap();
    assert!(json.contains("argon2id"), "{json}");
    let back: EncryptionConfig = serde_json::from_str(&json).unwrap();
    let again = Keys::unlock(dir, &back, &passphrase("right")).unwrap();
    assert_eq!(again.fingerprint(), keys.fingerprint());
    assert_eq!(again.hasher().id(b"x"), keys.hasher().id(b"x"));
    let err = Keys::unlock(dir, &back, &passphrase("wrong")).unwrap_err();
    assert!(matches!(err, Error::WrongKey(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "wrong passphrase or key file for store /stores/a"
    );
}

#[test]
fn a_key_file_is_created_private_reused_and_a_wrong_one_fails() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("keyfile");
    let path = dir.join("key");
    let (config, keys) = Keys::create(&KeySource::KeyFile(path.clone()), TEST_COSTS).unwrap();
    assert_eq!(config.kdf, Kdf::KeyFile);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second store with the same file shares the key.
    let (config2, _) = Keys::create(&KeySource::KeyFile(path.clone()), TEST_COSTS).unwrap();
    assert_eq!(config2.fingerprint, config.fingerprint);
    let unlocked = Keys::unlock(&dir, &config, &KeySource::KeyFile(path.clone())).unwrap();
    assert_eq!(unlocked.fingerprint(), keys.fingerprint());
    let other = dir.join("other");
    std::fs::write(&other, format!("{}\n", "ab".repeat(32))).unwrap();
    let err = Keys::unlock(&dir, &config, &KeySource::KeyFile(other)).unwrap_err();
    assert!(matches!(err, Error::WrongKey(_)), "{err}");
    let junk = dir.join("junk");
    std::fs::write(&junk, "not a key").unwrap();
    let err = Keys::unlock(&dir, &config, &KeySource::KeyFile(junk)).unwrap_err();
    assert!(err.to_string().contains("does not hold a key"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_wrong_kind_of_key_is_a_clear_error() {
    let dir = std::path::Path::new("/stores/b");
    let (config, _) = Keys::create(&passphrase("p"), TEST_COSTS).unwrap();
    let err = Keys::unlock(dir, &config, &KeySource::KeyFile("/nonexistent".into())).unwrap_err();
    assert!(err.to_string().contains("passphrase"), "{err}");
}

#[test]
fn an_encryption_section_with_huge_costs_or_bad_fields_is_refused() {
    let dir = std::path::Path::new("/stores/c");
    let (config, _) = Keys::create(&passphrase("p"), TEST_COSTS).unwrap();
    // Each cost one past its cap is refused before argon2 runs (at the caps themselves it
    // would run, for seconds: not here).
    for (memory, passes, lanes) in [
        (MAX_ARGON2_MEMORY_KIB + 1, 1, 1),
        (64, MAX_ARGON2_ITERATIONS + 1, 1),
        (64, 1, MAX_ARGON2_LANES + 1),
        (u32::MAX, 1, 1),
    ] {
        let mut huge = config.clone();
        if let Kdf::Argon2id {
            memory_kib,
            iterations,
            lanes: l,
            ..
        } = &mut huge.kdf
        {
            (*memory_kib, *iterations, *l) = (memory, passes, lanes);
        }
        let err = Keys::unlock(dir, &huge, &passphrase("p")).unwrap_err();
        assert!(err.to_string().contains("out of bounds"), "{err}");
    }
    let mut cut = config.clone();
    if let Kdf::Argon2id { wrapped_key, .. } = &mut cut.kdf {
        wrapped_key.truncate(10);
    }
    let err = Keys::unlock(dir, &cut, &passphrase("p")).unwrap_err();
    assert!(err.to_string().contains("wrong length"), "{err}");
    let mut cipher = config;
    cipher.cipher = "rot13".into();
    let err = Keys::unlock(dir, &cipher, &passphrase("p")).unwrap_err();
    assert!(err.to_string().contains("unknown cipher"), "{err}");
}

fn manifest() -> Manifest {
    let mut m = crate::store::Store::new_manifest("import /home/alice/secret.qcow2".into(), vec![]);
    m.name = "vm".into();
    m.labels.insert("note".into(), "payroll server".into());
    m
}

#[test]
fn a_sealed_manifest_hides_origin_and_labels_and_opens_back() {
    let keys = Keys::from_master(&[3; 32]);
    let plain = manifest();
    let mut m = plain.clone();
    keys.seal_manifest(&mut m).unwrap();
    let bytes = m.encode();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text.contains("secret.qcow2") && !text.contains("payroll"),
        "{text}"
    );
    let mut back = Manifest::decode("m", &bytes).unwrap();
    assert_eq!(back.name, "vm");
    keys.open_manifest("m", &mut back).unwrap();
    assert_eq!(back, plain);
}

#[test]
fn a_tampered_or_unsealed_manifest_is_refused_by_a_keyed_reader() {
    let keys = Keys::from_master(&[3; 32]);
    let mut m = manifest();
    keys.seal_manifest(&mut m).unwrap();
    let mut renamed = m.clone();
    renamed.name = "other".into();
    let err = keys
        .open_manifest("snapshots/ab", &mut renamed)
        .unwrap_err();
    assert!(err.to_string().contains("snapshots/ab"), "{err}");
    assert!(err.to_string().contains("MAC"), "{err}");
    let mut plain = manifest();
    assert!(keys.open_manifest("m", &mut plain).is_err());
    let mut other = m.clone();
    assert!(
        Keys::from_master(&[4; 32])
            .open_manifest("m", &mut other)
            .is_err()
    );
}

#[test]
fn a_passphrase_file_gives_its_first_line_within_bounds() {
    let dir = scratch("passphrase-file");
    let file = dir.join("p");
    std::fs::write(&file, b"pass word\r\nsecond line\n").unwrap();
    assert_eq!(read_passphrase_file(&file).unwrap(), b"pass word");
    std::fs::write(&file, b"\nafter an empty first line").unwrap();
    let err = read_passphrase_file(&file).unwrap_err().to_string();
    assert!(err.contains("empty first line"), "{err}");
    std::fs::write(&file, vec![b'a'; MAX_SECRET_LEN as usize + 1]).unwrap();
    let err = read_passphrase_file(&file).unwrap_err().to_string();
    assert!(err.contains("larger than"), "{err}");
    std::fs::write(&file, vec![b'a'; MAX_SECRET_LEN as usize]).unwrap();
    assert_eq!(
        read_passphrase_file(&file).unwrap().len(),
        MAX_SECRET_LEN as usize
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_key_change_at_the_last_generation_is_refused() {
    let pass = KeySource::Passphrase(b"old".to_vec());
    let (mut config, keys) = Keys::create(&pass, TEST_COSTS).unwrap();
    config.generation = u64::MAX;
    let err = keys
        .change(&config, &KeySource::Passphrase(b"new".to_vec()), TEST_COSTS)
        .expect_err("refused");
    assert!(err.to_string().contains("generation"), "{err}");
}
