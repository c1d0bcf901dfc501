"""The write path: batch checks (``validate``), segment files (``segments``), key sets, and the writer (``writer``)."""
