"""What GPTQModel reads from a GPTQ folder, for tests/test_interop_gptqmodel.py. Run with an interpreter that
imports gptqmodel (it needs no bitsmith):

    python gptqmodel_reader.py FOLDER IDS.safetensors OUT.safetensors [--past-producer-check]

loads FOLDER with `GPTQModel.load` on CPU with its torch kernel (BACKEND.GPTQ_TORCH, float16) and saves to OUT.safetensors
the dequantized weight [out, in] of every quantized linear (TorchLinear.dequantize_weight, after GPTQModel's own
v1 -> v2 zero point conversion), the logits of the token ids in IDS.safetensors, and the kernels it chose.

GPTQModel refuses a sym=False checkpoint in the v1 format unless its `meta.quantizer` names gptqmodel >= 0.9.0
(models/loader.py, `from_quantized`; quantization/config.py, `is_quantized_by_gptaq` and `is_quantized_by_foem`,
which test the same); bitsmith names itself
there. `--past-producer-check` answers that check with yes in this process only, so that the numbers GPTQModel
computes from the tensors can be compared; the folder is not changed.
"""
import sys

import torch
from gptqmodel import BACKEND, GPTQModel
from gptqmodel.quantization.config import BaseQuantizeConfig
from safetensors.torch import load_file, save_file


def main(folder: str, ids_path: str, out_path: str, past_producer_check: bool) -> None:
    if past_producer_check:
        BaseQuantizeConfig.is_quantized_by_gptaq = BaseQuantizeConfig.is_quantized_by_foem = lambda self: True
    model = GPTQModel.load(folder, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
    quantized = {name: m for name, m in model.model.named_modules() if hasattr(m, "qweight")}
    weights = {name: m.dequantize_weight().t().float().contiguous() for name, m in quantized.items()}
    ids = load_file(ids_path)["ids"]
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits.float()
    save_file({"logits": logits, **{f"weight/{name}": w for name, w in weights.items()}}, out_path,
              metadata={"kernels": ",".join(sorted({type(m).__name__ for m in quantized.values()}))})


if __name__ == "__main__":
    main(*sys.argv[1:4], past_producer_check="--past-producer-check" in sys.argv[4:])
