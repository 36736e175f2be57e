//! OpenAI CLIP in tch (placeholder: being written).
