//! Exporter: turns a trained CLIP-AGIQA checkpoint into one ONNX graph (image encoder + head,
//! text branch frozen into constants). Its work is tracked in its own issue; this crate holds
//! the place in the workspace layout.
