#!/usr/bin/env python
"""Test (and evaluate) a detector, mmrepvgg registered.

Same arguments as mmdet's tools/test.py, plus ``--deploy`` (fuse every
RepVGG block after loading) and ``--non-strict``. The checkpoint is read
safely and must match the config's model, else one ``error: ...`` line says
what is wrong; ``CONFIG MODEL.onnx`` runs an end-to-end ONNX file in the same
test loop (onnxruntime, or OpenVINO with ``--runtime openvino``).
"""
import importlib.util
import os.path as osp
import runpy


def parse_args(argv=None):
    from mmrepvgg.apis.runner import parse_runner_args
    from mmrepvgg.utils.cli import ToolArgumentParser
    parser = ToolArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', type=str,
                        help='dump predictions to a pickle file (.pkl)')
    parser.add_argument('--show', action='store_true',
                        help='show prediction results')
    parser.add_argument('--show-dir',
                        help='directory where painted images will be saved')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='the interval of show (s)')
    parser.add_argument('--tta', action='store_true',
                        help='test-time augmentation (needs tta_model and '
                        'tta_pipeline in the config)')
    parser.add_argument('--deploy', action='store_true',
                        help='switch the model to the fused deploy form '
                        'after loading the checkpoint')
    parser.add_argument(
        '--non-strict', action='store_true',
        help='load a checkpoint that does not match the model (keys only '
        'logged, as mmengine does)')
    parser.add_argument(
        '--runtime', choices=['onnxruntime', 'openvino'], default=None,
        help='what runs an .onnx checkpoint (default: onnxruntime)')
    return parse_runner_args(parser, argv)


def build_cfg(args):
    """The runner config for ``args``; raises ToolError on bad input."""
    import mmrepvgg  # noqa: F401  (registers RepVGG modules and hooks)
    from mmengine.config import ConfigDict

    from mmrepvgg.apis.runner import check_test_checkpoint, load_runner_config
    from mmrepvgg.utils.cli import ToolError
    from mmrepvgg.utils.fileio import check_output_paths
    is_onnx = args.checkpoint.endswith('.onnx')
    if args.runtime is not None and not is_onnx:
        raise ToolError(f'--runtime {args.runtime}: applies to an .onnx '
                        f'checkpoint, not {args.checkpoint}')
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        raise ToolError(f'--out {args.out}: must be a .pkl or .pickle file')
    if is_onnx:
        from mmrepvgg.export.runtime import check_model_file
        check_model_file(args.checkpoint)
    cfg = load_runner_config(
        args, [] if is_onnx else [(args.checkpoint, 'checkpoint')])
    if args.out is not None:
        check_output_paths([(args.config, 'config'), (
            args.checkpoint, 'ONNX file' if is_onnx else 'checkpoint')],
                           [args.out])
    if is_onnx:  # onnxruntime or OpenVINO, same test loop
        from mmrepvgg.export.evaluate import onnx_test_config
        onnx_test_config(cfg, args)
    else:
        check_test_checkpoint(cfg, args.checkpoint, args.config,
                              unsafe_load=args.unsafe_load,
                              strict=not args.non_strict)
        cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        from mmdet.engine.hooks.utils import trigger_visualization_hook
        if cfg.default_hooks.get('visualization') is None:
            raise ToolError('--show/--show-dir need a "visualization" hook '
                            'in default_hooks')
        trigger_visualization_hook(cfg, args)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise ToolError('--tta needs tta_model and tta_pipeline in the '
                            'config')
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        test_data_cfg = cfg.test_dataloader.dataset
        while 'dataset' in test_data_cfg:
            test_data_cfg = test_data_cfg['dataset']
        test_data_cfg.pipeline = cfg.tta_pipeline
    if args.deploy:
        # Runs after the checkpoint is loaded (before_test), so the trained
        # multi-branch weights are fused, not the random initialisation.
        hooks = list(cfg.get('custom_hooks', []))
        if not any(h.get('type') == 'SwitchToDeployHook' for h in hooks):
            hooks.append(dict(type='SwitchToDeployHook'))
        cfg.custom_hooks = hooks
    if args.out is not None:
        evaluator = cfg.test_evaluator
        cfg.test_evaluator = list(evaluator) if isinstance(
            evaluator, (list, tuple)) else [evaluator]
        cfg.test_evaluator.append(
            dict(type='DumpDetResults', out_file_path=args.out))
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmrepvgg.apis.runner import run_runner, run_tool
    return run_tool(lambda: run_runner(build_cfg(args), args, 'test'), args,
                    interrupted='interrupted')


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
