"""Packaging for mmrepvgg, an OpenMMLab (mmdet) plugin for RepVGG."""
import os.path as osp

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def get_version() -> str:
    namespace: dict = {}
    with open(osp.join(HERE, 'mmrepvgg', 'version.py'), encoding='utf-8') as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def read_long_description() -> str:
    path = osp.join(HERE, 'README.md')
    if not osp.exists(path):
        return ''
    with open(path, encoding='utf-8') as f:
        return f.read()


setup(
    name='mmrepvgg',
    version=get_version(),
    description='RepVGG blocks and backbones with exact structural '
    're-parameterization for mmdet detectors',
    long_description=read_long_description(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.8',
    packages=find_packages(exclude=('tests', 'tests.*', 'configs', 'tools')),
    install_requires=[
        'torch>=1.8',
        'mmengine>=0.10,<0.11',
        'mmcv>=2.0,<2.2',
        'mmdet>=3.3,<3.4',
        'numpy',
        'tqdm',
    ],
    extras_require={
        'onnx': ['onnx', 'onnxruntime'],
        # OpenVINO runtime and NNCF quantization (requirements/openvino.txt)
        'openvino': ['onnx', 'onnxruntime', 'openvino==2026.4.1',
                     'nncf==3.4.0'],
        'tests': ['pytest', 'onnx', 'onnxruntime', 'matplotlib'],
    },
    zip_safe=False,
)
