"""The `text` demo model: a tiny intent classifier that takes one string per row.

It exists so that BYTES tensors have a real model to travel to. The graph uses only
standard `ai.onnx` operators (StringNormalizer, StringSplit, TfIdfVectorizer, MatMul),
so ONNX Runtime runs it without extensions; OpenVINO has no string tensors, hence
backend "onnxruntime". The sentences are written here, so the build needs no download.
"""

from __future__ import annotations

import re
import string

import numpy as np

OPSET = 20  # StringSplit arrived in opset 20
IR_VERSION = 9
SEED = 0
WEIGHT_DECIMALS = 5
# The graph splits on spaces first (StringSplit's own whitespace rule: spaces only in
# ONNX Runtime), then on each of these in turn. ONNX has no "replace", so these become
# separators that leave empty tokens behind, and an empty token matches nothing.
SEPARATORS = ("\t", "\n", "\r", ".", ",", "!", "?")
# StringNormalizer in the "C" locale lower-cases ASCII letters only.
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
LABELS = ("hours", "order", "returns", "payment")

SENTENCES = {
    "hours": [
        "When do you open tomorrow?",
        "What time does the shop close today?",
        "Are you open on Sunday?",
        "What are your opening hours?",
        "Is the store open on public holidays?",
        "How late are you open tonight?",
        "Do you open early on Saturday?",
        "What time do you close on Friday?",
        "Are you closed over Christmas?",
        "When does the shop open in the morning?",
        "Is the shop open at lunch time?",
        "Until what time are you open this evening?",
        "Will you be open next Monday?",
        "What hours is the store open at the weekend?",
        "Do you close early on holidays?",
        "Can I come in before nine, when do you open?",
    ],
    "order": [
        "Where is my order?",
        "My parcel has not arrived yet.",
        "Can you track my delivery please?",
        "When will my order be shipped?",
        "The delivery is late, where is it?",
        "Has my package been sent?",
        "I ordered last week and nothing has arrived.",
        "What is the tracking number for my order?",
        "Is my order on its way?",
        "How long does shipping take to my address?",
        "The courier did not deliver my parcel.",
        "Can I change the delivery address of my order?",
        "My order status has not changed for days.",
        "When does my package arrive?",
        "Please send me an update on my delivery.",
        "Was my order dispatched today?",
    ],
    "returns": [
        "How do I return these shoes?",
        "I want to send this item back.",
        "Can I exchange the jacket for a bigger size?",
        "The product arrived broken, I want a replacement.",
        "What is your return policy?",
        "How many days do I have to return an item?",
        "Can I return something I bought in the shop?",
        "The shirt does not fit, can I exchange it?",
        "I would like to return a faulty kettle.",
        "Do I need the receipt to return an item?",
        "Where do I send the item back?",
        "Is return shipping free?",
        "My item is damaged, can I send it back?",
        "I want to exchange a gift I received.",
        "Can I return sale items?",
        "The wrong size arrived, how do I exchange it?",
    ],
    "payment": [
        "Can I pay by credit card?",
        "Do you accept cash?",
        "My card was charged twice.",
        "Can I pay with my phone?",
        "Why was my payment declined?",
        "Do you take contactless payments?",
        "I was charged the wrong amount.",
        "When will I get my money back?",
        "Can I pay in instalments?",
        "Do you accept gift cards as payment?",
        "The card payment failed at checkout.",
        "Is there a fee for paying by card?",
        "I need an invoice for my payment.",
        "Can I get a refund to my card?",
        "Do you accept bank transfer?",
        "Why is there a pending charge on my card?",
    ],
}


def tokens(text: str) -> list[str]:
    """What the graph computes, in Python: ASCII lower-case, split on spaces and SEPARATORS."""
    lower = text.translate(ASCII_LOWER)
    return [t for t in re.split(f"[ {re.escape(''.join(SEPARATORS))}]+", lower) if t]


def text_split() -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """75/25 stratified split of the sentences above; labels are indexes into LABELS."""
    from sklearn.model_selection import train_test_split

    texts = [s for label in LABELS for s in SENTENCES[label]]
    y = np.array([i for i, label in enumerate(LABELS) for _ in SENTENCES[label]], np.int64)
    X_train, X_test, y_train, y_test = train_test_split(
        texts, y, test_size=0.25, stratify=y, random_state=SEED
    )
    return X_train, X_test, y_train, y_test


def train_text(
    texts: list[str], y: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """TF-IDF (l2) + logistic regression; returns vocabulary, idf, weights, bias (rounded)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(tokenizer=tokens, lowercase=False, token_pattern=None)
    features = vectorizer.fit_transform(texts)
    classifier = LogisticRegression(C=10.0, max_iter=2000, random_state=SEED)
    classifier.fit(features, y)
    vocabulary = list(vectorizer.get_feature_names_out())
    idf = np.round(vectorizer.idf_, WEIGHT_DECIMALS).astype(np.float32)
    weights = np.round(classifier.coef_.T, WEIGHT_DECIMALS).astype(np.float32)
    bias = np.round(classifier.intercept_, WEIGHT_DECIMALS).astype(np.float32)
    return vocabulary, idf, weights, bias


def text_onnx(vocabulary: list[str], idf: np.ndarray, w: np.ndarray, b: np.ndarray) -> bytes:
    """text BYTES [N] -> probabilities FP32 [N, K], label INT64 [N]."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        # locale "C": every libc has it (en_US.UTF-8, the default, may be missing).
        helper.make_node(
            "StringNormalizer", ["text"], ["lower"], case_change_action="LOWER", locale="C"
        ),
        helper.make_node("StringSplit", ["lower"], ["words", "word_counts"]),
    ]
    pieces = "words"
    for i, mark in enumerate(SEPARATORS):
        nodes.append(
            helper.make_node("StringSplit", [pieces], [f"split{i}", f"n{i}"], delimiter=mark)
        )
        nodes.append(helper.make_node("Reshape", [f"split{i}", "rows"], [f"flat{i}"]))
        pieces = f"flat{i}"
    nodes += [
        helper.make_node(
            "TfIdfVectorizer",
            [pieces],
            ["tfidf"],
            mode="TFIDF",
            min_gram_length=1,
            max_gram_length=1,
            max_skip_count=0,
            ngram_counts=[0],
            ngram_indexes=list(range(len(vocabulary))),
            pool_strings=vocabulary,
            weights=idf.tolist(),
        ),
        helper.make_node("ReduceL2", ["tfidf", "feature_axis"], ["norm"], keepdims=1),
        helper.make_node("Max", ["norm", "epsilon"], ["safe_norm"]),
        helper.make_node("Div", ["tfidf", "safe_norm"], ["features"]),
        helper.make_node("MatMul", ["features", "w"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0),
    ]
    initializers = [
        numpy_helper.from_array(np.array([0, -1], np.int64), "rows"),
        numpy_helper.from_array(np.array([1], np.int64), "feature_axis"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "epsilon"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(b, "b"),
    ]
    classes = w.shape[1]
    graph = helper.make_graph(
        nodes,
        "text",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeserve-build"
    )
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def text_toml() -> str:
    labels = ", ".join(f'"{label}"' for label in LABELS)
    return f"""\
description = "Intent of a shop customer's message: hours, order, returns or payment"
backend = "onnxruntime"   # OpenVINO has no string tensors
max_batch_size = 64
labels = [{labels}]

[[inputs]]
name = "text"
datatype = "BYTES"
shape = [-1]

[[outputs]]
name = "probabilities"
datatype = "FP32"
shape = [-1, {len(LABELS)}]

[[outputs]]
name = "label"
datatype = "INT64"
shape = [-1]

[batching]
max_queue_delay_ms = 1.0
max_queue_size = 256

[warmup]
batch_sizes = [1, 8]
"""


def build_text() -> tuple[bytes, np.ndarray, np.ndarray]:
    """The model bytes and the held-out split (X as a unicode array, y int64)."""
    X_train, X_test, y_train, y_test = text_split()
    model = text_onnx(*train_text(X_train, y_train))
    return model, np.array(X_test, dtype=str), y_test
