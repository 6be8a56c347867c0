"""Files in and out: atomic result writing that never clobbers a finished run (:mod:`.atomic`), and streaming
safetensors checkpoints a tensor (or row block) at a time: the low-level file helpers (:mod:`.files`), the lazy
reader (:mod:`.reader`) and the sharded writer (:mod:`.writer`)."""
