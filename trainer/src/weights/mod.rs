//! CLIP weight loading (placeholder: being written).
