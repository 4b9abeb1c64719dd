"""nfnet_jax: NFNets (Brock et al. 2021) in JAX/Haiku: AGC, data-parallel training, tf.data."""

import setuptools

# Every range below was installed and tested together (see README, "Tested versions").
INSTALL_REQUIRES = [
  # JAX 0.11+ needs Python >= 3.12: each Python line gets the newest JAX tested on it.
  'jax>=0.10.1,<0.11; python_version < "3.12"',
  'jaxlib>=0.10.1,<0.11; python_version < "3.12"',
  'jax>=0.12.0,<0.13; python_version >= "3.12"',
  'jaxlib>=0.12.0,<0.13; python_version >= "3.12"',
  'dm-haiku>=0.0.17,<0.0.18',
  'optax>=0.2.8,<0.3',
  'chex>=0.1.92,<0.2',
  'jmp>=0.0.4,<0.1',
  'ml-collections>=1.1.0,<1.2',
  'absl-py>=2.1,<3',
  'numpy>=2.0,<2.5',
  'tensorflow-cpu>=2.21.0,<2.22',
  'tensorflow-datasets>=4.9.10,<4.10',
  # tfds imports it to locate dataset builders defined in packages but does not declare it.
  'importlib-resources>=6.4,<7',
  'orbax-checkpoint>=0.12.8,<0.13',
  'scikit-learn>=1.8,<1.10',
  'tqdm>=4.66,<5',
  'tensorboard>=2.20,<2.21',
  'pillow>=11,<14',
  # timm's weights (nfnet-convert --from-timm) without PyTorch: safetensors.numpy.
  'safetensors>=0.8.0,<0.9',
  'matplotlib>=3.10,<3.12',
]

TEST_REQUIRES = [
  'ruff>=0.17,<0.18',
  'pytest>=9.0,<10',
  'pytest-xdist>=3.8,<4',
  'hypothesis>=6.150,<7',
  'scipy>=1.15,<1.18',
]

setuptools.setup(
  name='nfnet_jax',
  version='0.1.0',
  description='NFNets (normalizer-free ResNets with adaptive gradient clipping) in JAX/Haiku.',
  packages=setuptools.find_packages(include=['nfnet_jax', 'nfnet_jax.*']),
  python_requires='>=3.11',
  package_data={'nfnet_jax': ['native/*.cc'], 'nfnet_jax.data': ['imagenet_classes.tsv']},
  install_requires=INSTALL_REQUIRES,
  extras_require={
    'test': TEST_REQUIRES,
    # Accelerators: jax's own extra on the jax pins above, so each Python line gets the same
    # jax, and the extra adds the jaxlib of that version and the libtpu or CUDA plugin built
    # for it. `gpu` is CUDA 12 (pip's CUDA wheels, NVIDIA driver only), `gpu-cuda13` CUDA 13.
    **{
      name: [
        pin.replace('jax>=', f'jax[{extra}]>=', 1)
        for pin in INSTALL_REQUIRES
        if pin.startswith('jax>=')
      ]
      for name, extra in (('tpu', 'tpu'), ('gpu', 'cuda12'), ('gpu-cuda13', 'cuda13'))
    },
  },
  entry_points={
    'console_scripts': [
      'nfnet-train=nfnet_jax.train:run_main',
      'nfnet-benchmark=nfnet_jax.benchmark:main',
      'nfnet-throughput=nfnet_jax.throughput:main',
      'nfnet-convert=nfnet_jax.convert:main',
      'nfnet-classify=nfnet_jax.classify:main',
      'nfnet-plot=nfnet_jax.plot:main',
      'nfnet-spp=nfnet_jax.spp:main',
    ],
  },
)
