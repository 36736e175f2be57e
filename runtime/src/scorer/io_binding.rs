//! IoBinding: inputs and outputs in buffers allocated once per session and batch shape, pinned
//! host memory on CUDA (ONNX Runtime copies pinned memory to the GPU asynchronously, pageable
//! memory it must stage first), plain CPU memory on the CPU provider.
//!
//! Batch shapes are bucketed to powers of two (capped at the batch size), padding with zero
//! rows: at most `log2(batch) + 1` buffer sets per session, and a partial batch never allocates
//! at run time. With CUDA graphs every batch is padded to the full batch and the buffers the
//! graph was captured with live on the device, as CUDA graphs replay fixed addresses.

use std::collections::BTreeMap;

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, PrimitiveTensorElementType, Tensor, TensorElementType};

use super::devices::Batch;

/// Where the buffers live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    /// CPU provider: ordinary host memory.
    Cpu,
    /// CUDA/TensorRT on device `N`: pinned host input and output.
    CudaPinned(i32),
    /// CUDA graphs on device `N`: device-resident input and output, fed from pinned staging.
    CudaGraph(i32),
}

struct Buffers {
    /// Host input, `[rows, ...]`, written in place each run.
    input: DynTensor,
    /// Device copy of the input (CUDA graphs only).
    device_input: Option<DynTensor>,
    /// Host output, `[rows]` or `[rows, heads]`.
    output: Tensor<f32>,
    /// Device output (CUDA graphs only).
    device_output: Option<Tensor<f32>>,
}

/// One session's binding and its buffers.
pub struct Bound {
    binding: IoBinding,
    host_in: Allocator,
    host_out: Allocator,
    device: Option<Allocator>,
    input_name: &'static str,
    input_type: TensorElementType,
    /// One image's shape without the batch dimension: `[3, R, R]` or `[R, R, 3]`.
    image_shape: [usize; 3],
    output_name: &'static str,
    /// `None` for `score [N]`, `Some(H)` for `scores [N, H]`.
    heads: Option<usize>,
    max_rows: usize,
    /// Every batch padded to `max_rows` (CUDA graphs, graphs with a fixed batch).
    pad_all: bool,
    buffers: BTreeMap<usize, Buffers>,
    /// The row count whose buffers are bound now.
    bound_rows: Option<usize>,
}

/// What [`Bound::new`] needs to know about the model.
pub struct BoundSpec {
    pub input_name: &'static str,
    pub input_type: TensorElementType,
    pub image_shape: [usize; 3],
    pub output_name: &'static str,
    pub heads: Option<usize>,
    pub max_rows: usize,
    /// Pad every batch to `max_rows` (forced for CUDA graphs).
    pub pad_all: bool,
}

type OrtResult<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Bound {
    pub fn new(session: &Session, memory: Memory, spec: BoundSpec) -> OrtResult<Bound> {
        let pinned = |device_id, kind| {
            MemoryInfo::new(
                AllocationDevice::CUDA_PINNED,
                device_id,
                AllocatorType::Device,
                kind,
            )
            .and_then(|info| Allocator::new(session, info))
            .map_err(err)
        };
        let (host_in, host_out, device) = match memory {
            Memory::Cpu => (Allocator::default(), Allocator::default(), None),
            Memory::CudaPinned(id) => (
                pinned(id, MemoryType::CPUInput)?,
                pinned(id, MemoryType::CPUOutput)?,
                None,
            ),
            Memory::CudaGraph(id) => (
                pinned(id, MemoryType::CPUInput)?,
                pinned(id, MemoryType::CPUOutput)?,
                Some(
                    MemoryInfo::new(
                        AllocationDevice::CUDA,
                        id,
                        AllocatorType::Device,
                        MemoryType::Default,
                    )
                    .and_then(|info| Allocator::new(session, info))
                    .map_err(err)?,
                ),
            ),
        };
        Ok(Bound {
            binding: session.create_binding().map_err(err)?,
            host_in,
            host_out,
            device,
            input_name: spec.input_name,
            input_type: spec.input_type,
            image_shape: spec.image_shape,
            output_name: spec.output_name,
            heads: spec.heads,
            max_rows: spec.max_rows.max(1),
            pad_all: spec.pad_all || matches!(memory, Memory::CudaGraph(_)),
            buffers: BTreeMap::new(),
            bound_rows: None,
        })
    }

    /// Rows a batch of `rows` images runs as.
    pub fn padded_rows(&self, rows: usize) -> usize {
        if self.pad_all {
            self.max_rows
        } else {
            rows.next_power_of_two().min(self.max_rows).max(rows)
        }
    }

    /// Buffer sets allocated so far (one per distinct padded row count).
    pub fn allocated_shapes(&self) -> Vec<usize> {
        self.buffers.keys().copied().collect()
    }

    fn buffers_for(&mut self, rows: usize) -> OrtResult<&mut Buffers> {
        if !self.buffers.contains_key(&rows) {
            let [a, b, c] = self.image_shape;
            let input_shape = [rows, a, b, c];
            let output_shape: Vec<usize> = match self.heads {
                None => vec![rows],
                Some(h) => vec![rows, h],
            };
            let buffers = Buffers {
                input: DynTensor::new(&self.host_in, self.input_type, input_shape).map_err(err)?,
                device_input: match &self.device {
                    Some(d) => Some(DynTensor::new(d, self.input_type, input_shape).map_err(err)?),
                    None => None,
                },
                output: Tensor::<f32>::new(&self.host_out, output_shape.clone()).map_err(err)?,
                device_output: match &self.device {
                    Some(d) => Some(Tensor::<f32>::new(d, output_shape).map_err(err)?),
                    None => None,
                },
            };
            self.buffers.insert(rows, buffers);
        }
        self.buffers
            .get_mut(&rows)
            .ok_or_else(|| "buffer set vanished".to_string())
    }

    /// Runs `batch` through `session` and returns its `batch.rows()` score rows.
    pub fn run(&mut self, session: &mut Session, batch: Batch<'_>) -> OrtResult<Vec<Vec<f32>>> {
        let rows = batch.rows();
        let padded = self.padded_rows(rows);
        if rows > self.max_rows {
            return Err(format!(
                "a batch of {rows} is above the bound buffers' {} rows",
                self.max_rows
            ));
        }
        let buffers = self.buffers_for(padded)?;
        match batch {
            Batch::PixelValues { data, .. } => write(&mut buffers.input, data)?,
            Batch::PixelsUint8 { data, .. } => write(&mut buffers.input, data)?,
        }
        if let Some(device_input) = &mut buffers.device_input {
            buffers.input.copy_into(device_input).map_err(err)?;
        }
        let rebind = self.bound_rows != Some(padded);
        let buffers = self
            .buffers
            .get_mut(&padded)
            .ok_or_else(|| "buffer set vanished".to_string())?;
        if rebind {
            self.binding.clear();
            match &mut buffers.device_output {
                Some(device_output) => self.binding.bind_output(self.output_name, device_output),
                None => self
                    .binding
                    .bind_output(self.output_name, &mut buffers.output),
            }
            .map_err(err)?;
            if let Some(device_input) = &buffers.device_input {
                // Bound once: the graph replays this address.
                self.binding
                    .bind_input(self.input_name, device_input)
                    .map_err(err)?;
            }
            self.bound_rows = Some(padded);
        }
        if buffers.device_input.is_none() {
            // Binding is what queues the host→device copy, so it happens every run.
            self.binding
                .bind_input(self.input_name, &buffers.input)
                .map_err(err)?;
        }
        drop(session.run_binding(&self.binding).map_err(err)?);
        self.binding.synchronize_outputs().map_err(err)?;
        if let Some(device_output) = &buffers.device_output {
            device_output.copy_into(&mut buffers.output).map_err(err)?;
        }
        let (_, values) = buffers.output.extract_tensor();
        let per_row = self.heads.unwrap_or(1);
        Ok(values
            .chunks(per_row)
            .take(rows)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// Copies `data` to the front of the host tensor and zeroes the padding rows.
fn write<T: PrimitiveTensorElementType + Copy + Default + std::fmt::Debug>(
    tensor: &mut DynTensor,
    data: &[T],
) -> OrtResult<()> {
    let (_, values) = tensor.try_extract_tensor_mut::<T>().map_err(err)?;
    if data.len() > values.len() {
        return Err(format!(
            "{} values do not fit the {}-value input buffer",
            data.len(),
            values.len()
        ));
    }
    values[..data.len()].copy_from_slice(data);
    values[data.len()..].fill(T::default());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU session on the `mean_f32` fixture (`[N, 3, 32, 32]` → `score [N]`).
    fn session() -> Session {
        crate::onnxruntime::init(None).expect("ONNX Runtime (ORT_DYLIB_PATH or .deps/lib)");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mean_f32.onnx");
        Session::builder(crate::onnxruntime::environment().unwrap())
            .unwrap()
            .commit_from_file(path)
            .unwrap()
    }

    #[test]
    fn buffers_are_bucketed_and_reused() {
        let mut session = session();
        let spec = BoundSpec {
            input_name: "pixel_values",
            input_type: TensorElementType::Float32,
            image_shape: [3, 32, 32],
            output_name: "score",
            heads: None,
            max_rows: 6,
            pad_all: false,
        };
        let mut bound = Bound::new(&session, Memory::Cpu, spec).unwrap();
        assert_eq!(
            (1..=6).map(|n| bound.padded_rows(n)).collect::<Vec<_>>(),
            [1, 2, 4, 4, 6, 6]
        );
        let image = 3 * 32 * 32;
        let data: Vec<f32> = (0..6 * image).map(|i| (i % 97) as f32 / 97.0).collect();
        let mut pointers = Vec::new();
        for rows in [3, 4, 1, 3, 6, 4, 6] {
            let batch = Batch::PixelValues {
                data: &data[..rows * image],
                rows,
            };
            let scores = bound.run(&mut session, batch).unwrap();
            assert_eq!(scores.len(), rows);
            let padded = bound.padded_rows(rows);
            pointers.push((padded, bound.buffers[&padded].input.data_ptr() as usize));
        }
        // One buffer set per padded shape, never reallocated.
        assert_eq!(bound.allocated_shapes(), [1, 4, 6]);
        for (rows, ptr) in &pointers {
            assert_eq!(bound.buffers[rows].input.data_ptr() as usize, *ptr);
        }
        let too_many = Batch::PixelValues {
            data: &[0.0; 7 * 3 * 32 * 32],
            rows: 7,
        };
        assert!(bound.run(&mut session, too_many).is_err());
    }

    #[test]
    fn fixed_shapes_pad_every_batch() {
        let session = session();
        let spec = BoundSpec {
            input_name: "pixel_values",
            input_type: TensorElementType::Float32,
            image_shape: [3, 32, 32],
            output_name: "score",
            heads: None,
            max_rows: 8,
            pad_all: true,
        };
        let bound = Bound::new(&session, Memory::Cpu, spec).unwrap();
        assert!((1..=8).all(|n| bound.padded_rows(n) == 8));
    }
}
