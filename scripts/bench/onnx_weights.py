"""Reads an ONNX model's initializers and metadata with numpy only.

The PyTorch baseline must run where only torch and numpy are installed (a GPU machine's stock
PyTorch image has no `onnx` package), so this parses the few protobuf fields it needs itself:
ModelProto.graph (7) -> GraphProto.initializer (5) -> TensorProto {dims 1, data_type 2,
float_data 4, int32_data 5, int64_data 7, name 8, raw_data 9, double_data 10}, and
ModelProto.metadata_props (14) -> {key 1, value 2}. Tensors with external data are refused.

    python onnx_weights.py --check MODEL.onnx   # compares against the onnx package if present
"""

import struct
import sys

import numpy as np

# TensorProto.DataType -> numpy dtype, for the types our graphs hold.
DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_,
          10: np.float16, 11: np.float64}


def _varint(buf, pos):
    result, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start=0, end=None):
    """Yields (field number, wire type, value) of one message; value is an int or a memoryview."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
        yield field, wire, value


def _packed_varints(view):
    out, pos = [], 0
    while pos < len(view):
        v, pos = _varint(view, pos)
        out.append(v)
    return out


def _tensor(view):
    dims, dtype, name, raw = [], None, "", None
    floats, ints32, ints64, doubles = [], [], [], []
    external = False
    for field, wire, value in _fields(view):
        if field == 1:
            dims.extend(_packed_varints(value) if wire == 2 else [value])
        elif field == 2:
            dtype = value
        elif field == 4:
            floats.extend(struct.unpack(f"<{len(value) // 4}f", value) if wire == 2
                          else struct.unpack("<f", value))
        elif field in (5, 7):
            vals = _packed_varints(value) if wire == 2 else [value]
            (ints32 if field == 5 else ints64).extend(vals)
        elif field == 8:
            name = bytes(value).decode()
        elif field == 9:
            raw = value
        elif field == 10:
            doubles.extend(struct.unpack(f"<{len(value) // 8}d", value) if wire == 2
                           else struct.unpack("<d", value))
        elif field == 14 and value == 1:
            external = True
    if external:
        raise ValueError(f"initializer {name!r} keeps its data in an external file")
    if dtype not in DTYPES:
        raise ValueError(f"initializer {name!r} has unsupported data type {dtype}")
    np_type = DTYPES[dtype]
    if raw is not None:
        array = np.frombuffer(raw, dtype=np_type).copy()
    elif dtype == 1:
        array = np.array(floats, dtype=np.float32)
    elif dtype == 11:
        array = np.array(doubles, dtype=np.float64)
    elif dtype == 7:
        array = np.array([v - (1 << 64) if v >= 1 << 63 else v for v in ints64], dtype=np.int64)
    elif dtype == 10:  # float16 bit patterns travel in int32_data
        array = np.array(ints32, dtype=np.uint16).view(np.float16)
    else:
        array = np.array([v - (1 << 64) if v >= 1 << 63 else v for v in ints32]).astype(np_type)
    return name, array.reshape([int(d) for d in dims])


def load(path):
    """Returns ({initializer name: numpy array}, {metadata key: value}) of an ONNX file."""
    with open(path, "rb") as f:
        buf = memoryview(f.read())
    weights, meta = {}, {}
    for field, wire, value in _fields(buf):
        if field == 7 and wire == 2:
            for g_field, g_wire, g_value in _fields(value):
                if g_field == 5 and g_wire == 2:
                    name, array = _tensor(g_value)
                    weights[name] = array
        elif field == 14 and wire == 2:
            entry = {f: bytes(v).decode() for f, _, v in _fields(value)}
            meta[entry.get(1, "")] = entry.get(2, "")
    return weights, meta


def _check(path):
    """Compares this reader with the onnx package on one model; exits 1 on a difference."""
    weights, meta = load(path)
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        print(f"onnx_weights: read {len(weights)} initializers, {len(meta)} metadata keys "
              f"from {path}; the onnx package is absent, nothing to compare against")
        return 0
    model = onnx.load(path)
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    expected_meta = {p.key: p.value for p in model.metadata_props}
    bad = [n for n in expected if n not in weights or weights[n].dtype != expected[n].dtype
           or weights[n].shape != expected[n].shape
           or not np.array_equal(weights[n], expected[n], equal_nan=True)]
    if bad or set(weights) != set(expected) or meta != expected_meta:
        print(f"onnx_weights: {path}: differs from onnx for {bad[:5]} "
              f"(names equal: {set(weights) == set(expected)}, metadata equal: {meta == expected_meta})")
        return 1
    print(f"onnx_weights: {len(weights)} initializers and {len(meta)} metadata keys of {path} "
          "equal the onnx package's")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--check":
        sys.exit(__doc__)
    sys.exit(_check(sys.argv[2]))
