"""Lossless BF16 (DFloat11, arXiv 2504.11651): the exponent byte Huffman-coded, sign and mantissa raw.

- codec.py: the format (`Coded`, the window layout), `encode`, the structure checks
- windows.py: the encoder's packing of codewords into windows
- cpu_decoder.py: `decode` / `decode_many`, vectorized across windows on CPU
- tasks.py: helper threads beside the decoder's and encoder's own loop
- parts.py: coded tensors as checkpoint parts, their metadata and manifest block
- folders.py: `compress_checkpoint` / `decompress_checkpoint` on folders of safetensors
The Triton decoder of the same format is kernels/triton_dfloat.py.
"""
from .codec import (
    CODEC,
    CODEC_VERSION,
    MAX_CODE_LENGTH,
    MAX_WINDOW_BITS,
    WINDOW_BITS,
    Coded,
    check_structure,
    check_window,
    encode,
    merge,
    split,
    tensor_sha256,
)
from .cpu_decoder import decode, decode_many
from .folders import compress_checkpoint, decompress_checkpoint
from .parts import (
    BATCH_VALUES,
    PART,
    CodedWriter,
    check_metadata,
    coded_tensors,
    config_block,
    describe,
    from_parts,
    is_part,
    lossless_block,
    part_size,
    pays,
    tensor_names,
    to_metadata,
    to_parts,
    write_coded,
)
from .tasks import default_threads

__all__ = ["BATCH_VALUES", "CODEC", "CODEC_VERSION", "MAX_CODE_LENGTH", "MAX_WINDOW_BITS", "PART", "WINDOW_BITS",
           "Coded", "CodedWriter", "check_metadata", "check_structure", "check_window", "coded_tensors",
           "compress_checkpoint", "config_block", "decode", "decode_many", "decompress_checkpoint", "default_threads",
           "describe", "encode", "from_parts", "is_part", "lossless_block", "merge", "part_size", "pays", "split",
           "tensor_names", "tensor_sha256", "to_metadata", "to_parts", "write_coded"]
