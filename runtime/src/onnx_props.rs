//! `metadata_props` read straight from an ONNX file's bytes, before ONNX Runtime sees it: the
//! runtime must know what a graph is (e.g. int8 for CPU only) before it registers an execution
//! provider, and opening a session just to ask would cost a full model load per provider.
//!
//! Only the protobuf wire format is needed: `ModelProto.metadata_props` is field 14, each a
//! `StringStringEntryProto { key = 1, value = 2 }`; every other field is skipped by its length.

use std::collections::BTreeMap;

const METADATA_PROPS: u64 = 14;

/// Why the bytes could not be read as a `ModelProto`.
#[derive(Debug, thiserror::Error)]
#[error("not an ONNX model: {0}")]
pub struct PropsError(String);

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, PropsError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| PropsError("truncated varint".into()))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(PropsError("varint longer than 10 bytes".into()))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], PropsError> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| PropsError("field runs past the end".into()))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    /// The next field: (number, length-delimited payload if wire type 2).
    fn field(&mut self) -> Result<(u64, Option<&'a [u8]>), PropsError> {
        let tag = self.varint()?;
        let (number, wire) = (tag >> 3, tag & 7);
        let payload = match wire {
            0 => {
                self.varint()?;
                None
            }
            1 => {
                self.take(8)?;
                None
            }
            2 => {
                let len = self.varint()?;
                Some(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                None
            }
            other => return Err(PropsError(format!("unsupported wire type {other}"))),
        };
        Ok((number, payload))
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }
}

/// The model's `metadata_props`, key → value.
pub fn metadata_props(model: &[u8]) -> Result<BTreeMap<String, String>, PropsError> {
    let mut props = BTreeMap::new();
    let mut reader = Reader {
        bytes: model,
        at: 0,
    };
    while !reader.done() {
        let (number, payload) = reader.field()?;
        let (METADATA_PROPS, Some(entry)) = (number, payload) else {
            continue;
        };
        let mut entry = Reader {
            bytes: entry,
            at: 0,
        };
        let (mut key, mut value) = (String::new(), String::new());
        while !entry.done() {
            match entry.field()? {
                (1, Some(k)) => key = String::from_utf8_lossy(k).into_owned(),
                (2, Some(v)) => value = String::from_utf8_lossy(v).into_owned(),
                _ => {}
            }
        }
        props.insert(key, value);
    }
    Ok(props)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len_field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn reads_props_and_skips_other_fields() {
        let mut model = vec![0x08, 0x08]; // ir_version = 8 (varint)
        model.extend(len_field(7, b"graph bytes"));
        let mut entry = len_field(1, b"agiqa.backbone");
        entry.extend(len_field(2, b"ViT-B/16"));
        model.extend(len_field(14, &entry));
        let props = metadata_props(&model).unwrap();
        assert_eq!(props["agiqa.backbone"], "ViT-B/16");
        assert_eq!(props.len(), 1);
        assert!(metadata_props(&model[..model.len() - 3]).is_err());
        assert!(metadata_props(b"not protobuf at all \xff\xff").is_err());
    }
}
