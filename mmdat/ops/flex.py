"""``flex_attention``, compiled once per process (CUDA implementations)."""
_FLEX = {}


def flex_supported() -> bool:
    """Whether ``torch.nn.attention.flex_attention`` can be imported."""
    if 'supported' not in _FLEX:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
            _FLEX['supported'] = True
        except ImportError:
            _FLEX['supported'] = False
    return _FLEX['supported']


def flex_attention(*args, **kwargs):
    """``torch.compile``d flex attention."""
    if 'fn' not in _FLEX:
        import torch
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention as fa
        # every block and input size is one more graph; the sizes reach the
        # score functions as tensors, so recompiles are per shape family
        cfg = torch._dynamo.config
        for name in ('recompile_limit', 'cache_size_limit'):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        _FLEX['fn'] = torch.compile(fa)
    return _FLEX['fn'](*args, **kwargs)


def create_block_mask(*args, **kwargs):
    from torch.nn.attention.flex_attention import create_block_mask as cbm
    # _compile: without it the dense (queries x keys) mask is materialised
    return cbm(*args, _compile=True, **kwargs)
