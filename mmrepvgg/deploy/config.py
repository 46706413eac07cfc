"""Turn a training config into its deploy twin (``deploy=True`` everywhere)."""
import copy
import inspect
from typing import Any, Callable, Optional

from mmengine.config import Config, ConfigDict


def _accepts_deploy(cls: Any) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return 'deploy' in params and callable(getattr(cls, 'switch_to_deploy',
                                                   None))


def walk_dicts(node: Any, fn: Callable[[dict], None]) -> None:
    """Call ``fn`` on every dict inside ``node`` (dicts, lists, tuples),
    parents before children."""
    if isinstance(node, dict):
        fn(node)
        for value in node.values():
            walk_dicts(value, fn)
    elif isinstance(node, (list, tuple)):
        for value in node:
            walk_dicts(value, fn)


def drop_pretrained(node: dict) -> None:
    """Set ``init_cfg=None`` where a module config loads a Pretrained file."""
    init = node.get('init_cfg')
    if isinstance(init, dict) and init.get('type') == 'Pretrained':
        node['init_cfg'] = None


def set_deploy(node: Any, lookup: Callable[[str], Any]) -> int:
    """Set ``deploy=True`` in place on every module config of ``node`` whose
    registered class takes a ``deploy`` argument and has ``switch_to_deploy``.

    Pretrained ``init_cfg`` of those modules is dropped (the deploy weights
    come from the converted checkpoint). Returns the number of configs set.
    """
    count = 0

    def visit(cfg: dict) -> None:
        nonlocal count
        t = cfg.get('type')
        cls = lookup(t) if isinstance(t, str) else (
            t if inspect.isclass(t) else None)
        if cls is not None and _accepts_deploy(cls):
            cfg['deploy'] = True
            drop_pretrained(cfg)
            count += 1

    walk_dicts(node, visit)
    return count


def make_deploy_config(cfg: Config,
                       lookup: Callable[[str], Any],
                       load_from: Optional[str] = None) -> Config:
    """Deploy twin of ``cfg``: a copy whose model builds in fused form.

    Args:
        cfg (Config): training config.
        lookup (callable): maps a ``type`` string to its class (e.g. mmdet's
            ``MODELS.get``).
        load_from (str, optional): checkpoint the twin loads by default.

    Raises:
        ValueError: if the model config has no re-parameterizable module.
    """
    new = Config(copy.deepcopy(cfg.to_dict()),
                 filename=getattr(cfg, 'filename', None))
    model = new.get('model')
    if not isinstance(model, (dict, ConfigDict)):
        raise ValueError('config has no "model" dict')
    if set_deploy(model, lookup) == 0:
        raise ValueError('config model has no module with a deploy option '
                         '(RepVGG, RepVGGBlock, ...)')
    new.load_from = load_from
    new.resume = False
    return new
