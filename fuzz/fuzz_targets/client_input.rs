#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nbd_proto_fuzz::client_input(data);
});
