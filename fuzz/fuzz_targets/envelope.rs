//! The envelope decoder, decompressor and sealing round trip under libFuzzer; the body is
//! `tierstack_core::testkit::fuzz::envelope`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tierstack_core::testkit::fuzz::envelope(data);
});
