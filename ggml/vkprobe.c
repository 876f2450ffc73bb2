// A look at the Vulkan devices the loader sees, without linking Vulkan:
// `neurod version` names the devices that ggml's Vulkan backend leaves out
// by default (CPU-type ones, such as Mesa's lavapipe, which it shows only
// with GGML_VK_VISIBLE_DEVICES). Only the first, stable fields of the
// Vulkan 1.0 structures are read.
#include "neuro.h"

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    int32_t sType; // VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO = 1
    const void * pNext;
    uint32_t flags;
    const void * pApplicationInfo;
    uint32_t enabledLayerCount;
    const char * const * ppEnabledLayerNames;
    uint32_t enabledExtensionCount;
    const char * const * ppEnabledExtensionNames;
} vk_instance_create_info;

typedef int32_t (*vk_create_instance)(const vk_instance_create_info *, const void *, void **);
typedef void (*vk_destroy_instance)(void *, const void *);
typedef int32_t (*vk_enumerate)(void *, uint32_t *, void **);
typedef void (*vk_properties)(void *, void *);

int neuro_vulkan_probe(neuro_vk_device * out, int max) {
    void * lib = dlopen("libvulkan.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        return -1;
    }
    vk_create_instance create = (vk_create_instance) dlsym(lib, "vkCreateInstance");
    vk_destroy_instance destroy = (vk_destroy_instance) dlsym(lib, "vkDestroyInstance");
    vk_enumerate enumerate = (vk_enumerate) dlsym(lib, "vkEnumeratePhysicalDevices");
    vk_properties props = (vk_properties) dlsym(lib, "vkGetPhysicalDeviceProperties");
    int n = -1;
    if (create && destroy && enumerate && props) {
        vk_instance_create_info ci;
        memset(&ci, 0, sizeof(ci));
        ci.sType = 1;
        void * inst = NULL;
        if (create(&ci, NULL, &inst) == 0 && inst != NULL) {
            void * devs[16];
            uint32_t count = 16;
            int32_t rc = enumerate(inst, &count, devs);
            if (rc == 0 || rc == 5 /* VK_INCOMPLETE */) {
                n = 0;
                for (uint32_t i = 0; i < count && n < max; i++) {
                    // VkPhysicalDeviceProperties: apiVersion, driverVersion,
                    // vendorID, deviceID, deviceType, deviceName[256], ...
                    union { unsigned char b[4096]; uint32_t u[1024]; } p;
                    memset(&p, 0, sizeof(p));
                    props(devs[i], &p);
                    out[n].type = (int) p.u[4];
                    snprintf(out[n].name, sizeof(out[n].name), "%.255s", (const char *) &p.b[20]);
                    n++;
                }
            }
            destroy(inst, NULL);
        }
    }
    dlclose(lib);
    return n;
}
