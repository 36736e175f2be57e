//! Multipart request bodies through the service's own part reading and admission limits
//! (`POST /score` with several images), without a model.

use agiqa_runtime::serve::read_parts_for_fuzzing;

/// The content type used when the input has no first line of its own.
const DEFAULT_CONTENT_TYPE: &[u8] = b"multipart/form-data; boundary=X";

/// Byte 0 is the admission capacity (1–8 parts); then the `Content-Type` header up to the first
/// `\n`, and the body after it. A body is either read into at most `capacity` parts or refused
/// with a 4xx or 503 — never a 5xx of our own making.
pub fn run(data: &[u8]) -> bool {
    let [capacity, rest @ ..] = data else {
        return false;
    };
    let (content_type, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(end) => (&rest[..end], &rest[end + 1..]),
        None => (DEFAULT_CONTENT_TYPE, rest),
    };
    let Ok(content_type) = std::str::from_utf8(content_type) else {
        return false;
    };
    let capacity = usize::from(capacity % 8) + 1;
    match read_parts_for_fuzzing(body, content_type, capacity) {
        Ok(parts) => {
            assert!(parts.len() <= capacity, "{} parts admitted", parts.len());
            true
        }
        Err((status, reason)) => {
            assert!(
                (400..500).contains(&status) || status == 503,
                "refused with {status}: {reason}"
            );
            false
        }
    }
}
