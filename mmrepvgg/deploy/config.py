"""A training config's deploy twin (``deploy=True`` wherever a module takes
it)."""
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


def make_deploy_config(cfg: Config,
                       lookup: Callable[[str], Any],
                       load_from: Optional[str] = None) -> Config:
    """A copy of ``cfg`` whose model builds in fused form: ``deploy=True``
    (and no Pretrained ``init_cfg``) in every module config whose class
    (``lookup(type)``, e.g. mmdet's ``MODELS.get``) takes ``deploy`` and has
    ``switch_to_deploy``; ``ValueError`` if there is none.
    """
    new = Config(copy.deepcopy(cfg.to_dict()),
                 filename=getattr(cfg, 'filename', None))
    model = new.get('model')
    if not isinstance(model, (dict, ConfigDict)):
        raise ValueError('config has no "model" dict')
    found = []

    def visit(node: dict) -> None:
        t = node.get('type')
        cls = lookup(t) if isinstance(t, str) else (
            t if inspect.isclass(t) else None)
        if cls is not None and _accepts_deploy(cls):
            node['deploy'] = True
            drop_pretrained(node)
            found.append(node)

    walk_dicts(model, visit)
    if not found:
        raise ValueError('config model has no module with a deploy option '
                         '(RepVGG, RepVGGBlock, ...)')
    new.load_from = load_from
    new.resume = False
    return new
