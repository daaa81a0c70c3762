"""What both products share, and only that: loading models and tokenizers by name (``sources``), finding
decoder blocks and Linears by type (``layers``), tokenising and padding (prompt, answer) pairs
(``tokenization``) and scoring answers by teacher forcing (``scoring``). ``lit_corsa`` and ``lit_tacq``
import from here and from themselves, never from each other."""
