//! CLIP's image towers as ONNX nodes, mirroring `agiqa_trainer::clip::{vision, resnet}` op for
//! op, with every weight stored under its checkpoint name.

use agiqa_trainer::clip::{Activation, ResNetConfig, VitConfig};

use crate::graph::{attr_int, attr_ints, AttentionOps, GraphBuilder, Weights};
use crate::ExportError;

/// PyTorch's BatchNorm epsilon, as CLIP's ResNets use it.
const BATCH_NORM_EPS: f32 = 1e-5;

/// Vision transformer: normalised `[N, 3, R, R]` pixels → `[N, E]` image features.
pub fn vision_transformer(
    g: &mut GraphBuilder,
    weights: &Weights,
    config: &VitConfig,
    pixels: &str,
    attention: AttentionOps,
) -> Result<String, ExportError> {
    let width = config.width;
    let p = config.patch_size;
    g.set_scope("visual.conv1");
    let conv_w = g.checkpoint_weight(weights, "visual.conv1.weight")?;
    let patches = g.node(
        "Conv",
        &[pixels, &conv_w],
        vec![
            attr_ints("kernel_shape", &[p, p]),
            attr_ints("strides", &[p, p]),
        ],
    )?;
    // [N, W, g, g] → [N, g², W]
    let flat = g.shape_constant(&[0, 0, -1])?;
    let tokens = g.node("Reshape", &[&patches, &flat], vec![])?;
    let tokens = g.node("Transpose", &[&tokens], vec![attr_ints("perm", &[0, 2, 1])])?;

    // The class token, broadcast to the batch: Expand([1, 1, W] → [N, 1, W]).
    g.set_scope("visual.class_embedding");
    let class = g.checkpoint_weight(weights, "visual.class_embedding")?;
    let class_shape = g.shape_constant(&[1, 1, width])?;
    let class = g.node("Reshape", &[&class, &class_shape], vec![])?;
    let shape = g.node("Shape", &[&tokens], vec![])?;
    let start = g.int_constant("zero", &[1], &[0])?;
    let end = g.int_constant("one", &[1], &[1])?;
    let batch = g.node("Slice", &[&shape, &start, &end], vec![])?;
    let rest = g.int_constant("class_rest", &[2], &[1, width])?;
    let target = g.node("Concat", &[&batch, &rest], vec![attr_int("axis", 0)])?;
    let class = g.node("Expand", &[&class, &target], vec![])?;
    let x = g.node("Concat", &[&class, &tokens], vec![attr_int("axis", 1)])?;

    g.set_scope("visual.positional_embedding");
    let positions = g.checkpoint_weight(weights, "visual.positional_embedding")?;
    let x = g.node("Add", &[&x, &positions], vec![])?;
    g.set_scope("visual.ln_pre");
    let mut x = g.layer_norm(weights, &x, "visual.ln_pre", config.layer_norm_eps)?;

    for layer in 0..config.layers {
        let prefix = format!("visual.transformer.resblocks.{layer}");
        x = residual_block(g, weights, &prefix, config, &x, attention)?;
    }

    g.set_scope("visual.ln_post");
    let zero = g.int_constant("class_index", &[], &[0])?;
    let class = g.node("Gather", &[&x, &zero], vec![attr_int("axis", 1)])?;
    let class = g.layer_norm(weights, &class, "visual.ln_post", config.layer_norm_eps)?;
    g.set_scope("visual.proj");
    let proj = g.checkpoint_weight(weights, "visual.proj")?;
    g.node("MatMul", &[&class, &proj], vec![])
}

/// `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
fn residual_block(
    g: &mut GraphBuilder,
    weights: &Weights,
    prefix: &str,
    config: &VitConfig,
    x: &str,
    attention: AttentionOps,
) -> Result<String, ExportError> {
    let width = config.width;
    let heads = config.heads;
    let head_dim = width / heads;
    g.set_scope(&format!("{prefix}.attn"));
    let h = g.layer_norm(weights, x, &format!("{prefix}.ln_1"), config.layer_norm_eps)?;
    let qkv = g.linear(
        weights,
        &h,
        &format!("{prefix}.attn.in_proj_weight"),
        Some(&format!("{prefix}.attn.in_proj_bias")),
    )?;
    let attended = match attention {
        AttentionOps::Plain => {
            // [N, L, 3W] → [N, L, 3, H, d] → [3, N, H, L, d]
            let split = g.shape_constant(&[0, 0, 3, heads, head_dim])?;
            let qkv = g.node("Reshape", &[&qkv, &split], vec![])?;
            let qkv = g.node(
                "Transpose",
                &[&qkv],
                vec![attr_ints("perm", &[2, 0, 3, 1, 4])],
            )?;
            let mut qkv_parts = Vec::with_capacity(3);
            for i in 0..3 {
                let index = g.int_constant("qkv_index", &[], &[i])?;
                qkv_parts.push(g.node("Gather", &[&qkv, &index], vec![attr_int("axis", 0)])?);
            }
            g.attention(&qkv_parts[0], &qkv_parts[1], &qkv_parts[2], head_dim)?
        }
        AttentionOps::MicrosoftMultiHead => {
            // [N, L, 3W] → three [N, L, W]; the kernel splits heads and scales by 1/√d itself.
            let mut parts = Vec::with_capacity(3);
            for i in 0..3 {
                let start = g.int_constant("qkv_start", &[1], &[i * width])?;
                let end = g.int_constant("qkv_end", &[1], &[(i + 1) * width])?;
                let axis = g.int_constant("qkv_axis", &[1], &[2])?;
                parts.push(g.node("Slice", &[&qkv, &start, &end, &axis], vec![])?);
            }
            g.microsoft_node(
                "MultiHeadAttention",
                &[&parts[0], &parts[1], &parts[2]],
                vec![attr_int("num_heads", heads)],
            )?
        }
    };
    let attended = g.linear(
        weights,
        &attended,
        &format!("{prefix}.attn.out_proj.weight"),
        Some(&format!("{prefix}.attn.out_proj.bias")),
    )?;
    let x = g.node("Add", &[x, &attended], vec![])?;

    g.set_scope(&format!("{prefix}.mlp"));
    let h = g.layer_norm(
        weights,
        &x,
        &format!("{prefix}.ln_2"),
        config.layer_norm_eps,
    )?;
    let h = g.linear(
        weights,
        &h,
        &format!("{prefix}.mlp.c_fc.weight"),
        Some(&format!("{prefix}.mlp.c_fc.bias")),
    )?;
    let h = activation(g, &h, config.activation)?;
    let h = g.linear(
        weights,
        &h,
        &format!("{prefix}.mlp.c_proj.weight"),
        Some(&format!("{prefix}.mlp.c_proj.bias")),
    )?;
    g.node("Add", &[&x, &h], vec![])
}

/// QuickGELU `x·σ(1.702x)` or exact GELU `x·½(1 + erf(x/√2))` (opset 17 has no Gelu op).
fn activation(g: &mut GraphBuilder, x: &str, kind: Activation) -> Result<String, ExportError> {
    match kind {
        Activation::QuickGelu => {
            let alpha = g.scalar("quick_gelu_alpha", 1.702)?;
            let scaled = g.node("Mul", &[x, &alpha], vec![])?;
            let gate = g.node("Sigmoid", &[&scaled], vec![])?;
            g.node("Mul", &[x, &gate], vec![])
        }
        Activation::Gelu => {
            let inv_sqrt2 = g.scalar("gelu_inv_sqrt2", std::f32::consts::FRAC_1_SQRT_2)?;
            let one = g.scalar("gelu_one", 1.0)?;
            let half = g.scalar("gelu_half", 0.5)?;
            let scaled = g.node("Mul", &[x, &inv_sqrt2], vec![])?;
            let erf = g.node("Erf", &[&scaled], vec![])?;
            let gate = g.node("Add", &[&erf, &one], vec![])?;
            let gate = g.node("Mul", &[&gate, &half], vec![])?;
            g.node("Mul", &[x, &gate], vec![])
        }
    }
}

/// OpenAI's ModifiedResNet: normalised `[N, 3, R, R]` pixels → `[N, E]` image features.
pub fn modified_resnet(
    g: &mut GraphBuilder,
    weights: &Weights,
    config: &ResNetConfig,
    pixels: &str,
) -> Result<String, ExportError> {
    g.set_scope("visual.stem");
    let mut x = pixels.to_string();
    for (i, stride) in [(1, 2), (2, 1), (3, 1)] {
        x = conv_bn(
            g,
            weights,
            &x,
            &format!("visual.conv{i}"),
            &format!("visual.bn{i}"),
            stride,
        )?;
        x = g.node("Relu", &[&x], vec![])?;
    }
    x = avg_pool(g, &x, 2)?;
    for (stage, &blocks) in config.layers.iter().enumerate() {
        for block in 0..blocks {
            let prefix = format!("visual.layer{}.{block}", stage + 1);
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            g.set_scope(&prefix);
            x = bottleneck(g, weights, &prefix, &x, stride)?;
        }
    }
    g.set_scope("visual.attnpool");
    attention_pool(g, weights, config, &x)
}

/// Conv (no bias, "same" padding) followed by inference-mode BatchNormalization, both under
/// the checkpoint's names (ONNX Runtime fuses the pair at load).
fn conv_bn(
    g: &mut GraphBuilder,
    weights: &Weights,
    x: &str,
    conv: &str,
    bn: &str,
    stride: i64,
) -> Result<String, ExportError> {
    let w_name = format!("{conv}.weight");
    let kernel = weights
        .get(&w_name)
        .ok_or_else(|| ExportError::MissingTensor(w_name.clone()))?
        .dims
        .clone();
    if kernel.len() != 4 {
        return Err(ExportError::Mismatch(format!(
            "{w_name} has shape {kernel:?}, expected a 4-d convolution kernel"
        )));
    }
    let (kh, kw) = (kernel[2], kernel[3]);
    let w = g.checkpoint_weight(weights, &w_name)?;
    let y = g.node(
        "Conv",
        &[x, &w],
        vec![
            attr_ints("kernel_shape", &[kh, kw]),
            attr_ints("strides", &[stride, stride]),
            attr_ints("pads", &[kh / 2, kw / 2, kh / 2, kw / 2]),
        ],
    )?;
    let inputs: Vec<String> = ["weight", "bias", "running_mean", "running_var"]
        .iter()
        .map(|suffix| g.checkpoint_weight(weights, &format!("{bn}.{suffix}")))
        .collect::<Result<_, _>>()?;
    g.node(
        "BatchNormalization",
        &[&y, &inputs[0], &inputs[1], &inputs[2], &inputs[3]],
        vec![crate::graph::attr_float("epsilon", BATCH_NORM_EPS)],
    )
}

fn avg_pool(g: &mut GraphBuilder, x: &str, k: i64) -> Result<String, ExportError> {
    if k == 1 {
        return Ok(x.to_string());
    }
    g.node(
        "AveragePool",
        &[x],
        vec![
            attr_ints("kernel_shape", &[k, k]),
            attr_ints("strides", &[k, k]),
        ],
    )
}

/// The anti-aliased bottleneck: 1×1, 3×3, avg-pool(stride), 1×1, with an avg-pool + 1×1
/// downsample on the identity path when the shape changes.
fn bottleneck(
    g: &mut GraphBuilder,
    weights: &Weights,
    prefix: &str,
    x: &str,
    stride: i64,
) -> Result<String, ExportError> {
    let out = conv_bn(
        g,
        weights,
        x,
        &format!("{prefix}.conv1"),
        &format!("{prefix}.bn1"),
        1,
    )?;
    let out = g.node("Relu", &[&out], vec![])?;
    let out = conv_bn(
        g,
        weights,
        &out,
        &format!("{prefix}.conv2"),
        &format!("{prefix}.bn2"),
        1,
    )?;
    let out = g.node("Relu", &[&out], vec![])?;
    let out = avg_pool(g, &out, stride)?;
    let out = conv_bn(
        g,
        weights,
        &out,
        &format!("{prefix}.conv3"),
        &format!("{prefix}.bn3"),
        1,
    )?;
    let identity = if weights.contains_key(&format!("{prefix}.downsample.0.weight")) {
        let pooled = avg_pool(g, x, stride)?;
        conv_bn(
            g,
            weights,
            &pooled,
            &format!("{prefix}.downsample.0"),
            &format!("{prefix}.downsample.1"),
            1,
        )?
    } else {
        x.to_string()
    };
    let sum = g.node("Add", &[&out, &identity], vec![])?;
    g.node("Relu", &[&sum], vec![])
}

/// Attention pooling: the mean token (plus positions) queries all tokens; `[N, C, h, w]` →
/// `[N, E]`.
fn attention_pool(
    g: &mut GraphBuilder,
    weights: &Weights,
    config: &ResNetConfig,
    x: &str,
) -> Result<String, ExportError> {
    let channels = config.width * 32;
    let heads = config.heads;
    let head_dim = channels / heads;
    let flat = g.shape_constant(&[0, 0, -1])?;
    let tokens = g.node("Reshape", &[x, &flat], vec![])?;
    let tokens = g.node("Transpose", &[&tokens], vec![attr_ints("perm", &[0, 2, 1])])?;
    let mean = g.node(
        "ReduceMean",
        &[&tokens],
        vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)],
    )?;
    let tokens = g.node("Concat", &[&mean, &tokens], vec![attr_int("axis", 1)])?;
    let positions = g.checkpoint_weight(weights, "visual.attnpool.positional_embedding")?;
    let tokens = g.node("Add", &[&tokens, &positions], vec![])?;
    let start = g.int_constant("first", &[1], &[0])?;
    let end = g.int_constant("second", &[1], &[1])?;
    let axis = g.int_constant("token_axis", &[1], &[1])?;
    let query = g.node("Slice", &[&tokens, &start, &end, &axis], vec![])?;
    let proj = |g: &mut GraphBuilder, input: &str, which: &str| {
        g.linear(
            weights,
            input,
            &format!("visual.attnpool.{which}.weight"),
            Some(&format!("visual.attnpool.{which}.bias")),
        )
    };
    let q = proj(g, &query, "q_proj")?;
    let k = proj(g, &tokens, "k_proj")?;
    let v = proj(g, &tokens, "v_proj")?;
    let q = g.split_heads(&q, heads, head_dim)?;
    let k = g.split_heads(&k, heads, head_dim)?;
    let v = g.split_heads(&v, heads, head_dim)?;
    let pooled = g.attention(&q, &k, &v, head_dim)?; // [N, 1, C]
    let squeeze = g.shape_constant(&[0, -1])?;
    let pooled = g.node("Reshape", &[&pooled, &squeeze], vec![])?;
    proj(g, &pooled, "c_proj")
}
