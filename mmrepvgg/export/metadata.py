"""What an exported end-to-end graph says about itself: the post-processing
settings baked into it, stored as JSON in the model's ``metadata_props``
(readable with ``onnx.load(path).metadata_props`` or onnxruntime's
``session.get_modelmeta().custom_metadata_map``)."""
import json

#: ``metadata_props`` key holding the baked-in post-processing settings.
METADATA_KEY = 'mmrepvgg.postprocess'


def read_metadata(path: str) -> dict:
    """The settings stored in the graph at ``path`` ({} when absent or not
    JSON)."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                value = json.loads(prop.value)
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}
