"""`PushToHub`: upload the run's ``adapters/final`` and a generated model card to the Hugging Face Hub once the run
is over (``callbacks.push.repo_id=me/my-lora``; ``null``, the default, pushes nothing).

``train.run`` calls ``on_run_end(run_dir)`` after it wrote ``metrics.json``, so the card shows the results; the
upload is ``lightning-lora push RUN_DIR REPO_ID`` (``lightning_lora.publish``). Pushing never fails the run: the
trained adapter is on disk whatever the network does. Offline (``HF_HUB_OFFLINE=1``), or when the Hub refuses,
one line says so and which command pushes it later. Only global rank 0 pushes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from lightning_lora.errors import UserError


class PushToHub(Callback):
    def __init__(self, repo_id: str | None = None, snapshot: str = "final", private: bool = False,
                 revision: str | None = None, commit_message: str | None = None, token: str | None = None) -> None:
        if repo_id is not None:
            from lightning_lora.publish import check_repo_id

            check_repo_id(repo_id)
        self.repo_id, self.snapshot, self.private = repo_id, snapshot, private
        self.revision, self.commit_message, self.token = revision, commit_message, token
        self.url: str | None = None  # the commit's URL once pushed

    @property
    def idle(self) -> bool:
        """No repository: this run pushes nothing (``train.run`` then leaves the callback out of the Trainer)."""
        return self.repo_id is None

    def later(self, run_dir: Path) -> str:
        """The command that pushes this run by hand."""
        return f"lightning-lora push {run_dir} {self.repo_id} --snapshot {self.snapshot}"

    def on_run_end(self, run_dir: str | Path) -> str | None:
        """Push the snapshot of the finished run in ``run_dir``; returns the commit URL (None: not pushed)."""
        if self.repo_id is None or rank_zero_only.rank != 0:
            return None
        from lightning_lora import hub, publish

        run_dir = Path(run_dir)
        if hub.offline():
            print(f"push: offline (HF_HUB_OFFLINE=1), {self.repo_id} not updated; later: {self.later(run_dir)}",
                  file=sys.stderr, flush=True)
            return None
        try:
            publication = publish.prepare(run_dir, self.repo_id, self.snapshot)
            self.url = publish.upload(publication, private=self.private, revision=self.revision,
                                      commit_message=self.commit_message, token=self.token)
        except UserError as exc:
            print(f"push: {exc}; the run is kept, push later: {self.later(run_dir)}", file=sys.stderr, flush=True)
            return None
        print(f"Pushed {publication.snapshot} to {self.repo_id}: {self.url}", flush=True)
        return self.url
