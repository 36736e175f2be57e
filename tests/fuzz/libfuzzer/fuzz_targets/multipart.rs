#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    agiqa_fuzz::multipart::run(data);
});
