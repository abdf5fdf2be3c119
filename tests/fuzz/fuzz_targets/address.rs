//! Arbitrary text to `normalise`: what it accepts is a fixed point, with no line break or space
//! in the key and an ASCII lower-case domain.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailer::recipients::normalise;

fuzz_target!(|raw: &str| {
    let Ok(address) = normalise(raw) else {
        return;
    };
    let key: &str = &address.key;

    let again = normalise(key).unwrap_or_else(|error| {
        panic!("normalise({raw:?}) gave {key:?}, which normalise then refuses: {error}")
    });
    assert_eq!(
        &*again.key, key,
        "normalise is not idempotent: {raw:?} -> {key:?} -> {:?}",
        again.key
    );

    assert!(
        !key.contains(['\r', '\n', ' ']),
        "normalise({raw:?}) gave {key:?}, which holds a CR, LF or space"
    );

    let domain = address.domain();
    assert_eq!(
        format!("{}@{domain}", address.local()),
        key,
        "local() and domain() do not make up the key"
    );
    assert_eq!(
        address.to_lettre().to_string(),
        key,
        "the lettre address differs from the key"
    );
    assert!(
        domain.is_ascii() && !domain.bytes().any(|b| b.is_ascii_uppercase()),
        "normalise({raw:?}) gave domain {domain:?}, which is not ASCII lower-case"
    );
});
