"""Pretrained Llama-family checkpoints (HF folders, GGUF files) as runs of this codebase.

hf_folder.py   HF folders <-> (config dict, tensors read one at a time, tokenizer.json)
shards.py      safetensors written a tensor at a time: model-0000x-of-0000n + index, f32/bf16
gguf_file.py   .gguf files -> the same triple (dequantized, llama.cpp's Q/K permutation undone)
convert.py     HF config <-> our config; HF tensors <-> our parameters (via layout.py)
layout.py      the one table: our parameter paths <-> HF tensor names, shapes, concat/transpose
importer.py    import into a run workdir; export a run to an HF folder
__main__.py    python -m pe_research.pretrained import|export
"""
