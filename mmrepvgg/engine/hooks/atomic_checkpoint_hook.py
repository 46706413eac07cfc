"""A CheckpointHook whose saves survive a kill at any moment."""
import os
import os.path as osp
from typing import List

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from mmrepvgg.utils.fileio import (atomic_write, atomic_write_bytes,
                                   remove_stale_temporaries)

#: File in the work dir naming the latest checkpoint (as mmengine's).
LAST_CHECKPOINT = 'last_checkpoint'


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` (registered in mmengine's root, for
    any scope), safe against a kill at any moment: for a local ``out_dir``
    it writes the checkpoint, then ``last_checkpoint``, atomically, and only
    then removes checkpoints beyond ``max_keep_ckpts`` (never one of a later
    step); mmengine 0.10 deletes first and writes in place. Temporaries of
    killed runs are removed when training starts.
    """

    def _is_local(self) -> bool:
        return isinstance(getattr(self, 'file_backend', None), LocalBackend)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if not (self._is_local() and is_main_process()):
            return
        removed: List[str] = []
        for folder in {osp.abspath(self.out_dir),
                       osp.abspath(runner.work_dir)}:
            removed += remove_stale_temporaries(folder)
        if removed:
            print_log('removed temporary files of an interrupted save: ' +
                      ', '.join(sorted(removed)), logger='current')

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        if not self._is_local():
            return super()._save_checkpoint_with_step(runner, step, meta)
        # Bookkeeping as mmengine's, but the outdated files are only
        # collected here and removed after the new one is in place.
        outdated: List[int] = []
        if self.max_keep_ckpts > 0 and not (
                self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            while len(self.keep_ckpt_ids) >= self.max_keep_ckpts:
                outdated.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids',
                                           list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir,
                                                     ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        save_kwargs = dict(
            file_client_args=self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args)

        if not is_main_process():
            # Runner.save_checkpoint is master-only; keep the call so that a
            # runner which gathers state from every rank still works.
            runner.save_checkpoint(self.out_dir, ckpt_filename, **save_kwargs)
            return

        def write_checkpoint(tmp: str) -> None:
            runner.save_checkpoint(
                osp.dirname(tmp), osp.basename(tmp), **save_kwargs)

        atomic_write(self.last_ckpt, write_checkpoint)
        atomic_write_bytes(osp.join(runner.work_dir, LAST_CHECKPOINT),
                           self.last_ckpt)

        current = osp.abspath(self.last_ckpt)
        # Only older steps: ids restored from a checkpoint's message hub
        # never justify deleting a file further along than this one.
        for old in (o for o in outdated if type(o) is int and o < step):
            path = self.file_backend.join_path(self.out_dir,
                                               self.filename_tmpl.format(old))
            if osp.abspath(path) != current and osp.isfile(path):
                os.remove(path)
