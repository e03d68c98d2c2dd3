use super::*;
use crate::crypto::ClusterSecret;

/// The keys of the secret 00 01 .. 1f.
fn pinned_keys() -> Keys {
    Keys::derive(&ClusterSecret(std::array::from_fn(|i| i as u8)))
}

fn sealed_v2(keys: &Keys, plain: &[u8]) -> (Vec<u8>, ChunkId) {
    let mut buf = vec![0u8; HEADER_LEN];
    buf.extend_from_slice(plain);
    let id = keys.seal_in_place(&mut buf);
    (buf, id)
}

fn sealed_v1(keys: &Keys, plain: &[u8]) -> (Vec<u8>, ChunkId) {
    let mut buf = vec![0u8; IV_LEN];
    buf.extend_from_slice(plain);
    let id = keys.seal_v1_in_place(&mut buf);
    (buf, id)
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

#[test]
fn aes256_ctr_matches_nist_sp800_38a_f5_5() {
    // NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt.
    let key = unhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
    let iv = unhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff");
    let mut data = unhex(concat!(
        "6bc1bee22e409f96e93d7e117393172a",
        "ae2d8a571e03ac9c9eb76fac45af8e51",
        "30c81c46a35ce411e5fbc1191a0a52ef",
        "f69f2445df4f9b17ad2b417be66c3710"
    ));
    let mut cipher = Aes256Ctr::new_from_slices(&key, &iv).unwrap();
    cipher.apply_keystream(&mut data);
    assert_eq!(
        hex::encode(data),
        concat!(
            "601ec313775789a5b7a7f504bbf3d228",
            "f443e3ca4d62b59aca84e990cacaf5c5",
            "2b0930daa23de94ce87017ba2d84988d",
            "dfc9c58db67aada613c2dd08457941a6"
        )
    );
}

/// Known answers computed outside dfs: the keys with Python's hmac module
/// (HKDF-SHA256, salt `dfs cluster v1`, infos `dfs chunk id v2` and `dfs
/// chunk mac v2`), the id and the tag with `b3sum --keyed`, the ciphertext
/// with `openssl enc -aes-256-ctr`. A change here makes every format 2
/// chunk unreadable: it needs a new format, not an edit.
#[test]
fn format_2_matches_known_answers() {
    const PLAIN: &[u8] = b"The quick brown fox jumps over the lazy dog, chunk format v2.";
    let keys = pinned_keys();
    assert_eq!(
        hex::encode(keys.id2),
        "f295710acbe942c65b6d40568a7eac69d56b8e8aacfa8570e72f6ae3312e346b"
    );
    assert_eq!(
        hex::encode(keys.mac),
        "a5ae00520aacf3b49d644c1df46eac16295ff21cd61b3d3416b0d32f38e7cf2d"
    );
    let id = keys.chunk_id(PLAIN);
    assert_eq!(id.to_hex(), "c8beaa8839b14849ba3c5033a940cdff551518e3");
    assert_eq!(
        keys.chunk_id(b"").to_hex(),
        "c11e9aa7141f354e852dbba66051a170123542aa"
    );
    // magic || IV || tag || ciphertext; the IV's low 64 bits are all ones,
    // so the counter carries into the high half (a 128-bit counter).
    let sealed = [
        b"dfschnk2".to_vec(),
        unhex("0001020304050607ffffffffffffffff"),
        unhex("934fd267e1b4f5706573f3b828a83eaa4eea37b095426c509fef58297cc5aebe"),
        unhex(concat!(
            "d6f0be7683680f64204b15ab2a67039a0f295bd0eff44696f9510383d72dc80c",
            "8a85a7736b96ea399f263114fed2abb43f78c12b9f6212d75711325e5d"
        )),
    ]
    .concat();
    keys.verify_sealed(&sealed, &id).unwrap();
    let mut opened = sealed.clone();
    assert_eq!(keys.open_in_place(&mut opened, &id).unwrap(), HEADER_LEN);
    assert_eq!(&opened[HEADER_LEN..], PLAIN);
}

#[test]
fn sealing_writes_the_format_2_layout_in_one_pass() {
    let keys = Keys::derive(&ClusterSecret::generate());
    // Longer than one piece, and not a whole number of them.
    let plain: Vec<u8> = (0..3 * PIECE as u32 + 1001)
        .map(|i| (i * 7) as u8)
        .collect();
    let (sealed, id) = sealed_v2(&keys, &plain);
    assert_eq!(id, keys.chunk_id(&plain));
    assert_eq!(sealed.len(), HEADER_LEN + plain.len());
    assert_eq!(&sealed[..8], b"dfschnk2");
    let (iv, tag, body) = (
        &sealed[IV_AT..TAG_AT],
        &sealed[TAG_AT..HEADER_LEN],
        &sealed[HEADER_LEN..],
    );
    let mut expected_tag = blake3::Hasher::new_keyed(&keys.mac);
    expected_tag.update(body);
    expected_tag.update(b"dfschnk2");
    expected_tag.update(iv);
    expected_tag.update(&id.0);
    assert_eq!(tag, expected_tag.finalize().as_bytes());
    let mut decrypted = body.to_vec();
    Aes256Ctr::new_from_slices(&keys.enc, iv)
        .unwrap()
        .apply_keystream(&mut decrypted);
    assert_eq!(decrypted, plain);
}

#[test]
fn seal_then_open_round_trips_and_hides_plaintext() {
    let keys = Keys::derive(&ClusterSecret::generate());
    let plain = b"attack at dawn, attack at dawn, attack at dawn".to_vec();
    let (mut buf, id) = sealed_v2(&keys, &plain);
    assert!(
        !buf.windows(16).any(|w| w == &plain[..16]),
        "sealed bytes must not hold plaintext"
    );
    assert_eq!(keys.open_in_place(&mut buf, &id).unwrap(), HEADER_LEN);
    assert_eq!(&buf[HEADER_LEN..], &plain[..]);
}

#[test]
fn an_empty_chunk_seals_and_opens() {
    let keys = Keys::derive(&ClusterSecret::generate());
    let (mut buf, id) = sealed_v2(&keys, b"");
    keys.verify_sealed(&buf, &id).unwrap();
    assert_eq!(keys.open_in_place(&mut buf, &id).unwrap(), buf.len());
}

#[test]
fn sealing_twice_uses_fresh_ivs_under_one_id() {
    let keys = Keys::derive(&ClusterSecret::generate());
    let (a, id_a) = sealed_v2(&keys, &[5u8; 64]);
    let (b, id_b) = sealed_v2(&keys, &[5u8; 64]);
    assert_ne!(a, b);
    assert_eq!(id_a, id_b, "the same plaintext dedups");
}

#[test]
fn every_changed_byte_fails_both_checks() {
    let keys = Keys::derive(&ClusterSecret::generate());
    let plain: Vec<u8> = (0..200_000u32).map(|i| (i * 13) as u8).collect();
    let (sealed, id) = sealed_v2(&keys, &plain);
    let mut positions = vec![0, 7, IV_AT, TAG_AT - 1, TAG_AT, HEADER_LEN - 1, HEADER_LEN];
    positions.extend([HEADER_LEN + PIECE, sealed.len() - 1]);
    for at in positions {
        let mut bad = sealed.clone();
        bad[at] ^= 0x01;
        assert!(keys.verify_sealed(&bad, &id).is_err(), "byte {at}");
        assert!(keys.open_in_place(&mut bad, &id).is_err(), "byte {at}");
    }
    let mut short = sealed[..sealed.len() - 1].to_vec();
    assert!(keys.verify_sealed(&short, &id).is_err());
    assert!(keys.open_in_place(&mut short, &id).is_err());
    let mut long = sealed.clone();
    long.push(0);
    assert!(keys.verify_sealed(&long, &id).is_err());
    let mut header_only = sealed[..20].to_vec();
    assert!(keys.open_in_place(&mut header_only, &id).is_err());
}

#[test]
fn a_chunk_does_not_pass_for_another_id_or_key() {
    let keys = Keys::derive(&ClusterSecret::generate());
    let (sealed, id) = sealed_v2(&keys, b"some chunk");
    let (_, other_id) = sealed_v2(&keys, b"another chunk");
    assert!(matches!(
        keys.verify_sealed(&sealed, &other_id),
        Err(CryptoError::BadTag(_))
    ));
    let other_keys = Keys::derive(&ClusterSecret::generate());
    assert!(other_keys.verify_sealed(&sealed, &id).is_err());
    assert!(other_keys.open_in_place(&mut sealed.clone(), &id).is_err());
}

#[test]
fn verify_leaves_the_chunk_as_it_was() {
    let keys = Keys::derive(&ClusterSecret::generate());
    let (sealed, id) = sealed_v2(&keys, &[9u8; 100_000]);
    let before = sealed.clone();
    keys.verify_sealed(&sealed, &id).unwrap();
    assert_eq!(sealed, before);
}

#[test]
fn a_failed_format_2_open_restores_the_bytes() {
    let keys = Keys::derive(&ClusterSecret::generate());
    let (mut sealed, id) = sealed_v2(&keys, &[3u8; 70_000]);
    sealed[HEADER_LEN + 5] ^= 0x10;
    let before = sealed.clone();
    assert!(keys.open_v2(&mut sealed, &id).is_err());
    assert_eq!(sealed, before);
}

#[test]
fn format_1_chunks_still_open_and_verify() {
    let keys = Keys::derive(&ClusterSecret::generate());
    let plain: Vec<u8> = (0..150_000u32).map(|i| (i * 3) as u8).collect();
    let (sealed, id) = sealed_v1(&keys, &plain);
    assert_eq!(id, keys.chunk_id_v1(&plain));
    assert_ne!(id, keys.chunk_id(&plain), "the formats never share an id");
    assert_eq!(ChunkFormat::of(&sealed), ChunkFormat::V1);
    keys.verify_sealed(&sealed, &id).unwrap();
    let mut opened = sealed.clone();
    assert_eq!(keys.open_in_place(&mut opened, &id).unwrap(), IV_LEN);
    assert_eq!(&opened[IV_LEN..], &plain[..]);
    let mut bad = sealed.clone();
    bad[IV_LEN + 100_000] ^= 0x80;
    assert!(matches!(
        keys.verify_sealed(&bad, &id),
        Err(CryptoError::Mismatch { .. })
    ));
    assert!(keys.open_in_place(&mut bad, &id).is_err());
    assert!(matches!(
        keys.open_in_place(&mut sealed[..10].to_vec(), &id),
        Err(CryptoError::TooShort(10))
    ));
}

#[test]
fn a_format_1_chunk_whose_iv_starts_with_the_magic_still_reads() {
    let keys = Keys::derive(&ClusterSecret::generate());
    let plain = vec![0x42u8; 5000];
    let mut sealed = [MAGIC_V2.as_slice(), &[1u8; 8], &plain].concat();
    let (iv, body) = sealed.split_at_mut(IV_LEN);
    keys.cipher(iv).apply_keystream(body);
    let id = keys.chunk_id_v1(&plain);
    assert_eq!(ChunkFormat::of(&sealed), ChunkFormat::V2);
    keys.verify_sealed(&sealed, &id).unwrap();
    assert_eq!(keys.open_in_place(&mut sealed, &id).unwrap(), IV_LEN);
    assert_eq!(&sealed[IV_LEN..], &plain[..]);
}
