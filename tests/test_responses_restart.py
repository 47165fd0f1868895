"""Conversations survive a restart of everything: `expertmesh serve --config FILE` (the real CLI, in a
subprocess with a Ray of its own) stores a response in its SQLite data directory, stops on Ctrl-C
(Serve and Ray shut down), starts again on the same directory, and a client continues the
conversation with previous_response_id."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml

from tests import chat_checkpoints
from tests.conversations import prompt_counter
from tests.serving import tiny_config

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-restart"
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `expertmesh serve` process: its own local Ray (no RAY_ADDRESS), our config."""

    def __init__(self, config_path: Path, log: Path):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.log = log.open("a")
        self.process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(config_path)],
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=ROOT)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout], daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                pytest.fail(f"expertmesh serve printed no URL in {START_TIMEOUT_S} s; see {log}")
            if "OpenAI API at" in line:
                self.base_url = line.rsplit(" ", 1)[1].strip()
                return
            if self.process.poll() is not None:
                pytest.fail(f"expertmesh serve exited with {self.process.returncode}; see {log}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=180)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=120)
        finally:
            self.log.close()


def test_a_conversation_continues_after_serve_and_ray_restart(tmp_path):
    checkpoint = chat_checkpoints.qwen3_moe(tmp_path / "qwen3")
    data_dir = tmp_path / "data"
    config = tiny_config("restart", checkpoint, http={"port": free_port()}, grpc={"enabled": False},
                         sessions={"store": "sqlite", "data_dir": str(data_dir)})
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    log = tmp_path / "serve.log"

    server = Server(path, log)
    try:
        client = server.client()
        first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=5, temperature=0,
                                        reasoning={"effort": "none"})
    finally:
        assert server.stop() == 0, log.read_text()[-3000:]
    assert (data_dir / "sessions.sqlite3").exists()

    server = Server(path, log)
    try:
        client = server.client()
        stored = client.responses.retrieve(first.id)
        assert stored.output_text == first.output_text and stored.usage == first.usage
        second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                         max_output_tokens=5, reasoning={"effort": "none"})
    finally:
        assert server.stop() == 0, log.read_text()[-3000:]
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == prompt_counter(checkpoint)([
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
