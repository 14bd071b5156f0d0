"""``engine.cpu_share``: a step that prefills and found no room for the idle workers' cores at its
start (another task runnable then: the router or the client, for a moment) takes them at a later
layer once there is room, and gives them back once another worker has work; the tokens stay
those of one thread."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from engine_testlib import TinyModel, random_prompts

from engine import cpu_kernels
from engine.llm import LLM
from protocol.sampling import SamplingParams

pytestmark = pytest.mark.skipif(cpu_kernels.turned_off(), reason="TANDEM_CPU_KERNELS=0 turns the kernels off")


def test_prefill_step_takes_the_idle_cores_once_there_is_room(tiny_model: Callable[[str], TinyModel],
                                                                tmp_path) -> None:
    path = str(tiny_model("llama").path)
    params = SamplingParams(temperature=0.0, max_tokens=2, logprobs=2, ignore_eos=True)
    prompts = random_prompts([100, 90, 80])
    one = LLM(path, dtype="bfloat16", num_blocks=64, num_threads=1, progress=False).generate(prompts, params)
    share = dict(num_threads=1, num_prefill_threads=1, num_idle_prefill_threads=2, cpu_share_dir=str(tmp_path))
    llm = LLM(path, dtype="bfloat16", num_blocks=64, progress=False, **share)
    other = LLM(path, dtype="bfloat16", num_blocks=64, progress=False, **share).engine
    share_ = llm.engine.cpu_share
    share_.cores = 2
    layers = llm.engine.runner.model.layers
    per_layer: list[int] = []
    runnable: list[int] = []  # /proc/loadavg's other runnable tasks, one reading per call (then 0)
    share_.runnable_others = lambda: runnable.pop(0) if runnable else 0
    forward = type(layers[0]).forward

    def layer_spy(layer, *args, **kwargs):
        per_layer.append(torch.get_num_threads())
        return forward(layer, *args, **kwargs)

    for layer in layers:
        layer.forward = functools.partial(layer_spy, layer)
    n = len(layers)
    # The router is runnable at the step's start, then gone: the step starts on one thread and
    # takes the second core before its next layer; the decode steps after it run on one.
    runnable[:] = [1]
    got = llm.generate(prompts[:1], params)
    assert per_layer[:n] == [1] + [2] * (n - 1) and per_layer[n:] == [1] * n
    assert torch.get_num_threads() == 1
    # Still runnable before every layer: never taken.
    per_layer.clear()
    runnable[:] = [1] * n
    got += llm.generate(prompts[1:2], params)
    assert per_layer[:n] == [1] * n
    # Another worker with work: never taken.
    per_layer.clear()
    other.add_request("busy", random_prompts([5])[0], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    other.step()
    got += llm.generate(prompts[2:], params)
    assert per_layer[:n] == [1] * n and torch.get_num_threads() == 1
    assert [r.outputs[0].token_ids for r in got] == [r.outputs[0].token_ids for r in one]
    assert [r.outputs[0].logprobs for r in got] == [r.outputs[0].logprobs for r in one]
