"""The Triton paged decode attention against the reference backend's (which test_paged checks against
contiguous attention), under the interpreter on machines without a GPU. Unused cache rows hold NaN, so a
read through a wrong block-table entry or past a sequence's end shows in the output."""

import pytest
import torch

from ingot.backends.cuda.paged_attention import paged_decode_attention
from ingot.backends.reference import paged_decode_attention as reference
from tests.test_paged import scatter_paged


# (head_dim, kv heads, group, window, block_size, seq_lens): lengths on, just past and far past block edges
CASES = [
    (64, 2, 1, 0, 16, [1, 16, 17, 50]),
    (32, 1, 4, 0, 8, [9, 3, 24]),
    (64, 2, 3, 10, 16, [40, 5, 33]),  # a group of 3 is padded to 4 query rows; window inside and across blocks
    (128, 4, 2, 0, 16, [31]),
    (32, 2, 8, 17, 4, [2, 30, 19, 4]),
]


# parts: as parts_for chooses (1 for these narrow tables), one (the unsplit kernel), and 3 (some parts
# of the short sequences empty)
@pytest.mark.parametrize("parts", [None, 1, 3])
@pytest.mark.parametrize("d,hkv,g,window,bs,lens", CASES)
def test_paged_decode_equals_reference(kernel_device, d, hkv, g, window, bs, lens, parts):
    gen = torch.Generator().manual_seed(d + 10 * hkv + 100 * g + window)
    S = max(lens)
    k = (torch.randn(len(lens), S, hkv, d, generator=gen) * 2).half()
    v = torch.randn(len(lens), S, hkv, d, generator=gen).half()
    q = torch.randn(len(lens), hkv * g, d, generator=gen).half()
    kc, vc, tables = scatter_paged(k, v, lens, 64, bs, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    want = reference(q.float(), kc.float(), vc.float(), tables, seq_lens, d**-0.5, window)
    dev = kernel_device
    got = paged_decode_attention(q.to(dev), kc.to(dev), vc.to(dev), tables.to(dev), seq_lens.to(dev),
                                 scale=d**-0.5, window=window, parts=parts)
    assert got.dtype == torch.float16 and not got.isnan().any()
    err = ((got.float().cpu() - want).norm() / want.norm()).item()
    assert err < 2e-3, err


def test_paged_decode_refuses_mismatched_shapes(kernel_device):
    q = torch.zeros(1, 4, 32, dtype=torch.float16)
    kc = torch.zeros(2, 16, 3, 32, dtype=torch.float16)  # 4 query heads over 3 KV heads
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_attention(q, kc, kc, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                               scale=1.0)


def test_parts_fill_the_gpu_without_short_parts():
    from ingot.backends.cuda.paged_attention import MAX_PARTS, parts_for

    assert parts_for(8, 40) == 10  # one stream of 8 KV heads, 640 positions in blocks of 16: 4 blocks a part
    assert parts_for(8, 1000) == MAX_PARTS
    assert parts_for(256, 40) == 2  # 32 streams: the sequences nearly fill the GPU alone
    assert parts_for(512, 40) == parts_for(8, 3) == 1
