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


def set_deploy(node: Any, lookup: Callable[[str], Any]) -> int:
    """Set ``deploy=True`` in place on every module config of ``node`` whose
    registered class takes a ``deploy`` argument and has ``switch_to_deploy``.

    Pretrained ``init_cfg`` of those modules is dropped (the deploy weights
    come from the converted checkpoint). Returns the number of configs set.
    """
    count = 0
    if isinstance(node, dict):
        t = node.get('type')
        if isinstance(t, str):
            cls = lookup(t)
        else:
            cls = t if inspect.isclass(t) else None
        if cls is not None and _accepts_deploy(cls):
            node['deploy'] = True
            init = node.get('init_cfg')
            if isinstance(init, dict) and init.get('type') == 'Pretrained':
                node['init_cfg'] = None
            count += 1
        for value in node.values():
            count += set_deploy(value, lookup)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += set_deploy(value, lookup)
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
