{
  "targets": [
    {
      "target_name": "vhostkit",
      "sources": [
        "native/vhostkit.c",
        "native/vk_errors.c",
        "native/vk_fault.c",
        "native/vk_fd.c",
        "native/vk_mmap.c",
        "native/vk_socket.c",
        "native/vk_tap.c",
        "native/vk_watcher.c"
      ],
      "cflags": ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"]
    }
  ]
}
