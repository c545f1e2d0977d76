/*
 * Types shared by fakenvml.c and the device table that build.py generates.
 *
 * The NVML types below copy the layouts of the real nvml.h (and of the ctypes
 * structures in pynvml.py) field for field; fakenvml.c checks the sizes with
 * static assertions.
 */
#ifndef FAKENVML_H
#define FAKENVML_H

#include <stddef.h>

typedef enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_ALREADY_INITIALIZED = 5,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_INSUFFICIENT_POWER = 8,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_IRQ_ISSUE = 11,
    NVML_ERROR_LIBRARY_NOT_FOUND = 12,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_CORRUPTED_INFOROM = 14,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_OPERATING_SYSTEM = 17,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_IN_USE = 19,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_NO_DATA = 21,
    NVML_ERROR_UNKNOWN = 999
} nvmlReturn_t;

typedef enum { NVML_FEATURE_DISABLED = 0, NVML_FEATURE_ENABLED = 1 } nvmlEnableState_t;

typedef enum {
    NVML_CLOCK_GRAPHICS = 0,
    NVML_CLOCK_SM = 1,
    NVML_CLOCK_MEM = 2,
    NVML_CLOCK_VIDEO = 3,
    NVML_CLOCK_COUNT
} nvmlClockType_t;

typedef enum { NVML_TEMPERATURE_GPU = 0 } nvmlTemperatureSensors_t;

typedef enum {
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0,
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
} nvmlMemoryErrorType_t;

typedef enum { NVML_VOLATILE_ECC = 0, NVML_AGGREGATE_ECC = 1 } nvmlEccCounterType_t;

typedef int nvmlPstates_t; /* NVML_PSTATE_0 == 0 ... NVML_PSTATE_15 == 15 */

typedef enum {
    NVML_VALUE_TYPE_DOUBLE = 0,
    NVML_VALUE_TYPE_UNSIGNED_INT = 1,
    NVML_VALUE_TYPE_UNSIGNED_LONG = 2,
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3,
    NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4,
    NVML_VALUE_TYPE_SIGNED_INT = 5,
    NVML_VALUE_TYPE_UNSIGNED_SHORT = 6
} nvmlValueType_t;

typedef union {
    double dVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    signed long long sllVal;
    signed int siVal;
    unsigned short usVal;
} nvmlValue_t;

typedef struct {
    unsigned int fieldId;
    unsigned int scopeId;
    long long timestamp;   /* microseconds since 1970 */
    long long latencyUsec;
    nvmlValueType_t valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used; /* v1: everything not free, reserved memory included */
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

/* One value of the capture: `ok` is 0 when the capture lacks it (NVML_ERROR_NOT_SUPPORTED). */
typedef struct {
    int ok;
    long long v;
} fake_value;

typedef struct {
    unsigned int pid;
    unsigned long long used_memory; /* bytes, or FAKE_VALUE_NOT_AVAILABLE */
    unsigned int gpu_instance_id;   /* FAKE_NO_INSTANCE outside MIG */
    unsigned int compute_instance_id;
    int compute;  /* listed by nvmlDeviceGetComputeRunningProcesses_v3 */
    int graphics; /* listed by nvmlDeviceGetGraphicsRunningProcesses_v3 */
} fake_process;

#define FAKE_VALUE_NOT_AVAILABLE 0xFFFFFFFFFFFFFFFFULL /* NVML_VALUE_NOT_AVAILABLE */
#define FAKE_NO_INSTANCE 0xFFFFFFFFU

/*
 * One entry of the device table: a GPU or a MIG device. GPUs come first, so a
 * GPU's position in the table is its NVML index. An nvmlDevice_t is a pointer
 * to an entry. NULL strings and fake_values with ok == 0 are "not supported".
 */
struct nvmlDevice_st {
    unsigned int gpu_index; /* the GPU's NVML index; for a MIG device, its parent's */
    int is_mig;
    unsigned int mig_index; /* MIG devices only: index under the parent */
    fake_value gpu_instance_id;
    fake_value compute_instance_id;

    const char *name;
    const char *uuid;
    const char *serial;
    const char *vbios_version;
    const char *pci_bus_id; /* "00000000:0C:00.0" */
    unsigned int pci_domain;
    unsigned int pci_bus;
    unsigned int pci_device;
    fake_value pci_device_id;
    fake_value pci_subsystem_id;
    fake_value minor_number;

    fake_value memory_total; /* bytes */
    fake_value memory_reserved;
    fake_value memory_used; /* v2 meaning: excludes reserved */
    fake_value memory_free;

    fake_value cuda_cc_major;
    fake_value cuda_cc_minor;

    fake_value power_usage_mw;
    fake_value power_average_mw;
    fake_value power_instant_mw;
    fake_value power_limit_mw;
    fake_value enforced_power_limit_mw;
    fake_value default_power_limit_mw;
    fake_value min_power_limit_mw;
    fake_value max_power_limit_mw;

    fake_value clock_mhz[NVML_CLOCK_COUNT];
    fake_value max_clock_mhz[NVML_CLOCK_COUNT];

    fake_value pcie_link_gen_max;
    fake_value pcie_link_gen_gpu_max;
    fake_value pcie_link_gen_current;
    fake_value pcie_link_width_max;
    fake_value pcie_link_width_current;
    fake_value pcie_replay_counter;

    fake_value ecc_mode_current; /* 0 or 1 */
    fake_value ecc_mode_pending;
    fake_value ecc_errors[2][2]; /* [nvmlMemoryErrorType_t][nvmlEccCounterType_t] */
    fake_value mig_mode_current;
    fake_value mig_mode_pending;

    fake_value numa_node_id;
    fake_value performance_state;
    fake_value utilization_gpu_pct;
    fake_value utilization_memory_pct;
    fake_value utilization_encoder_pct;
    fake_value utilization_decoder_pct;
    fake_value temperature_gpu_c;
    fake_value temperature_memory_c;
    fake_value fan_speed_pct;
    fake_value clocks_event_reasons;

    int processes_known;
    const fake_process *processes;
    unsigned int process_count;
};

/* Defined by the generated device table. */
extern const struct nvmlDevice_st fake_devices[];
extern const unsigned int fake_device_count; /* GPUs and MIG devices */
extern const unsigned int fake_gpu_count;
extern const char *const fake_driver_version;     /* NULL when not captured */
extern const char *const fake_nvml_version;
extern const fake_value fake_cuda_driver_version; /* e.g. 13010 for CUDA 13.1 */
extern const unsigned int fake_max_mig_devices;
extern const unsigned long long fake_energy_base_mj;
extern const unsigned int fake_utilization_sampling_period_us;

#endif
