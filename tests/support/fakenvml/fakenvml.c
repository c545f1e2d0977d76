/*
 * fakenvml: a fake libnvidia-ml.so.1 that serves GPUs recorded by nvidia-smi.
 *
 * build.py turns a capture into a device table (a generated C file, see
 * fakenvml.h) and links it with this file. Handles (nvmlDevice_t) point into
 * that table. Every value comes from the capture's idle state; a value the
 * capture lacks makes its call return NVML_ERROR_NOT_SUPPORTED. Calls before
 * nvmlInit* return NVML_ERROR_UNINITIALIZED, a bad handle or NULL output
 * pointer NVML_ERROR_INVALID_ARGUMENT.
 *
 * Fault injection, read from the environment by every nvmlInit* call:
 *
 *   FAKENVML_INIT_RESULT=<name or number>
 *       nvmlInit* fails with this nvmlReturn_t: a number ("9") or a name with
 *       or without the NVML_ERROR_ prefix ("DRIVER_NOT_LOADED",
 *       "NVML_ERROR_LIB_RM_VERSION_MISMATCH", "NO_PERMISSION"). An unknown
 *       name gives NVML_ERROR_UNKNOWN.
 *   FAKENVML_INIT_HANG=1
 *       nvmlInit* never returns (it sleeps in a loop).
 *   FAKENVML_INIT_CRASH=1
 *       nvmlInit* raises SIGSEGV, killing the process.
 *   FAKENVML_CONTROL=/path/to/file
 *       Device calls consult this file. It is re-read only when a stat() shows
 *       a new mtime, size or inode, so replace it atomically (rename) when the
 *       size stays the same. A missing file means no faults. A line
 *       "lost <index>" makes every call on GPU <index> and on its MIG devices,
 *       the handle lookups included, return NVML_ERROR_GPU_IS_LOST until the
 *       line is removed (indexes 0..63). A line "noevents <index>" makes GPU
 *       <index> support no events (nvmlDeviceGetSupportedEventTypes and
 *       nvmlDeviceRegisterEvents return NVML_ERROR_NOT_SUPPORTED) while it is
 *       there. A line "xid <index> <xid> [<gpu instance> <compute instance>]"
 *       is an event, not a state: each time the fake reads a new version of the
 *       file it posts one Xid critical error per such line, in file order, to
 *       every event set that has GPU <index> registered for Xid events (the
 *       instance ids default to 0xFFFFFFFF, "not in a MIG instance"). Events
 *       posted before a set registers the GPU are not delivered to it, as with
 *       the real driver. A line "nopermission <index>" makes
 *       nvmlDeviceSetPowerManagementLimit on GPU <index> return
 *       NVML_ERROR_NO_PERMISSION (as for a user who is not root), and a line
 *       "nopowercap <index>" makes it return NVML_ERROR_NOT_SUPPORTED, while
 *       the line is there.
 *
 * Synthesised values:
 *   - nvmlDeviceGetTotalEnergyConsumption and field 83 return
 *     fake_energy_base_mj + power usage x time since the library was
 *     initialised (CLOCK_MONOTONIC), in mJ; NOT_SUPPORTED when the capture has
 *     no power draw.
 *   - Encoder/decoder utilisation report fake_utilization_sampling_period_us.
 *   - nvmlDeviceGetMaxMigDeviceCount returns fake_max_mig_devices while MIG mode
 *     is enabled, else 0; the captured MIG devices fill indexes 0..n-1 and the
 *     rest return NVML_ERROR_NOT_FOUND.
 *
 * MIG device handles serve their name, UUID, memory, GPU/compute instance ids,
 * the parent's compute capability and the parent's processes that run in them;
 * every other query returns NVML_ERROR_NOT_SUPPORTED (events included: events
 * of a MIG instance arrive on its parent GPU with the instance ids set).
 *
 * Power limits: nvmlDeviceSetPowerManagementLimit on a GPU whose capture has
 * its limit constraints sets the management and enforced limits that the
 * getters then report; a limit outside [min, max] returns
 * NVML_ERROR_INVALID_ARGUMENT, as the driver does, and MIG handles return
 * NVML_ERROR_NOT_SUPPORTED. The driver keeps a limit until reboot; the fake
 * keeps it until the last nvmlShutdown, so that each test starts from the
 * capture.
 *
 * Events: GPUs support Xid, P-state and clock events, and single/double-bit
 * ECC events while ECC is enabled; only Xid events are ever posted (see
 * FAKENVML_CONTROL). nvmlEventSetWait_v2 returns the oldest queued event; with
 * none queued it returns NVML_ERROR_GPU_IS_LOST when a GPU registered in the
 * set is lost, else it polls the control file until timeoutms has passed and
 * returns NVML_ERROR_TIMEOUT (at once for a timeout of 0).
 */
#include "fakenvml.h"

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* nvml.h declares `struct nvmlDevice_st *`; the added const keeps the table const, same ABI. */
typedef const struct nvmlDevice_st *nvmlDevice_t;

/* The layouts must match nvml.h and pynvml's ctypes structures byte for byte. */
_Static_assert(sizeof(nvmlMemory_t) == 24, "nvmlMemory_t");
_Static_assert(sizeof(nvmlMemory_v2_t) == 40, "nvmlMemory_v2_t");
_Static_assert(sizeof(nvmlPciInfo_t) == 68, "nvmlPciInfo_t");
_Static_assert(offsetof(nvmlPciInfo_t, busId) == 36, "nvmlPciInfo_t.busId");
_Static_assert(sizeof(nvmlProcessInfo_t) == 24, "nvmlProcessInfo_t");
_Static_assert(sizeof(nvmlFieldValue_t) == 40, "nvmlFieldValue_t");
_Static_assert(offsetof(nvmlFieldValue_t, value) == 32, "nvmlFieldValue_t.value");

typedef struct {
    nvmlDevice_t device; /* the physical GPU, for MIG instances too */
    unsigned long long eventType;
    unsigned long long eventData; /* the Xid, for Xid events */
    unsigned int gpuInstanceId;   /* FAKE_NO_INSTANCE outside MIG */
    unsigned int computeInstanceId;
} nvmlEventData_t;

_Static_assert(sizeof(nvmlEventData_t) == 32, "nvmlEventData_t");

#define nvmlEventTypeSingleBitEccError 0x1ULL
#define nvmlEventTypeDoubleBitEccError 0x2ULL
#define nvmlEventTypePState 0x4ULL
#define nvmlEventTypeXidCriticalError 0x8ULL
#define nvmlEventTypeClock 0x10ULL

struct fake_event {
    nvmlEventData_t data;
    struct fake_event *next;
};

/* An event set: what each GPU registered, and the events queued for delivery. */
struct nvmlEventSet_st {
    unsigned long long *registered; /* per GPU index: the event types registered */
    struct fake_event *head;        /* oldest queued event */
    struct fake_event *tail;
    struct nvmlEventSet_st *next; /* the next live set */
};
typedef struct nvmlEventSet_st *nvmlEventSet_t;

/* NVML's versioned-struct tag: struct size in the low bits, version in the top byte. */
#define NVML_STRUCT_VERSION(type, ver) ((unsigned int)(sizeof(type) | ((ver) << 24U)))
#define nvmlMemory_v2 NVML_STRUCT_VERSION(nvmlMemory_v2_t, 2)
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25

#define NVML_FI_DEV_ECC_SBE_VOL_TOTAL 3
#define NVML_FI_DEV_ECC_DBE_VOL_TOTAL 4
#define NVML_FI_DEV_MEMORY_TEMP 82
#define NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION 83
#define NVML_FI_DEV_PCIE_REPLAY_COUNTER 94
#define NVML_FI_DEV_POWER_AVERAGE 185
#define NVML_FI_DEV_POWER_INSTANT 186

static const struct {
    int code;
    const char *name;    /* as in NVML_ERROR_<name> */
    const char *message; /* what nvmlErrorString returns */
} errors[] = {
    {NVML_SUCCESS, "SUCCESS", "Success"},
    {NVML_ERROR_UNINITIALIZED, "UNINITIALIZED", "Uninitialized"},
    {NVML_ERROR_INVALID_ARGUMENT, "INVALID_ARGUMENT", "Invalid Argument"},
    {NVML_ERROR_NOT_SUPPORTED, "NOT_SUPPORTED", "Not Supported"},
    {NVML_ERROR_NO_PERMISSION, "NO_PERMISSION", "Insufficient Permissions"},
    {NVML_ERROR_ALREADY_INITIALIZED, "ALREADY_INITIALIZED", "Already Initialized"},
    {NVML_ERROR_NOT_FOUND, "NOT_FOUND", "Not Found"},
    {NVML_ERROR_INSUFFICIENT_SIZE, "INSUFFICIENT_SIZE", "Insufficient Size"},
    {NVML_ERROR_INSUFFICIENT_POWER, "INSUFFICIENT_POWER", "Insufficient External Power"},
    {NVML_ERROR_DRIVER_NOT_LOADED, "DRIVER_NOT_LOADED", "Driver Not Loaded"},
    {NVML_ERROR_TIMEOUT, "TIMEOUT", "Timeout"},
    {NVML_ERROR_IRQ_ISSUE, "IRQ_ISSUE", "Interrupt Request Issue"},
    {NVML_ERROR_LIBRARY_NOT_FOUND, "LIBRARY_NOT_FOUND", "NVML Shared Library Not Found"},
    {NVML_ERROR_FUNCTION_NOT_FOUND, "FUNCTION_NOT_FOUND", "Function Not Found"},
    {NVML_ERROR_CORRUPTED_INFOROM, "CORRUPTED_INFOROM", "Corrupted infoROM"},
    {NVML_ERROR_GPU_IS_LOST, "GPU_IS_LOST", "GPU is lost"},
    {NVML_ERROR_RESET_REQUIRED, "RESET_REQUIRED", "GPU requires restart"},
    {NVML_ERROR_OPERATING_SYSTEM, "OPERATING_SYSTEM",
     "The operating system has blocked the request."},
    {NVML_ERROR_LIB_RM_VERSION_MISMATCH, "LIB_RM_VERSION_MISMATCH",
     "RM has detected an NVML/RM version mismatch."},
    {NVML_ERROR_IN_USE, "IN_USE", "In Use"},
    {NVML_ERROR_MEMORY, "MEMORY", "Insufficient Memory"},
    {NVML_ERROR_NO_DATA, "NO_DATA", "No Data"},
    {NVML_ERROR_UNKNOWN, "UNKNOWN", "Unknown Error"},
};

/* Library state, guarded by `lock`. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned int init_count;      /* nvmlInit* minus nvmlShutdown calls */
static struct timespec init_time;    /* when init_count left 0, for the energy counter */
static char *control_path;           /* FAKENVML_CONTROL, or NULL */
static int control_seen;             /* control_stat describes the file last read */
static struct stat control_stat;
static unsigned long long lost_gpus; /* bit i: GPU i is lost */
static unsigned long long no_event_gpus; /* bit i: GPU i supports no events */
static unsigned long long no_permission_gpus; /* bit i: setting GPU i's power limit is denied */
static unsigned long long no_power_cap_gpus;  /* bit i: GPU i's power limit cannot be set */
static unsigned int set_power_limit_mw[64];   /* per GPU index: the limit set, 0 when none */
static nvmlEventSet_t event_sets;        /* every live event set */

/* ---------------------------------------------------------------- helpers */

static int env_flag(const char *name)
{
    const char *value = getenv(name);
    return value != NULL && value[0] != '\0' && strcmp(value, "0") != 0;
}

static nvmlReturn_t parse_init_result(const char *text)
{
    char *end;
    long number = strtol(text, &end, 0);
    if (end != text && *end == '\0')
        return (nvmlReturn_t)number;
    if (strncmp(text, "NVML_ERROR_", 11) == 0)
        text += 11;
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if (strcmp(text, errors[i].name) == 0)
            return (nvmlReturn_t)errors[i].code;
    return NVML_ERROR_UNKNOWN;
}

static long long elapsed_ms_since_init(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    pthread_mutex_lock(&lock);
    long long ms = (now.tv_sec - init_time.tv_sec) * 1000LL +
                   (now.tv_nsec - init_time.tv_nsec) / 1000000;
    pthread_mutex_unlock(&lock);
    return ms;
}

static int is_initialized(void)
{
    pthread_mutex_lock(&lock);
    int initialized = init_count > 0;
    pthread_mutex_unlock(&lock);
    return initialized;
}

/* Queues an event on every set with the GPU registered for its type. Caller holds `lock`. */
static void post_event(unsigned int gpu_index, unsigned long long type, unsigned long long value,
                       unsigned int gpu_instance, unsigned int compute_instance)
{
    if (gpu_index >= fake_gpu_count)
        return;
    for (nvmlEventSet_t set = event_sets; set != NULL; set = set->next) {
        if (!(set->registered[gpu_index] & type))
            continue;
        struct fake_event *event = calloc(1, sizeof *event);
        if (event == NULL)
            continue; /* dropped, as the driver drops events when its queue is full */
        event->data.device = &fake_devices[gpu_index];
        event->data.eventType = type;
        event->data.eventData = value;
        event->data.gpuInstanceId = gpu_instance;
        event->data.computeInstanceId = compute_instance;
        if (set->tail == NULL)
            set->head = event;
        else
            set->tail->next = event;
        set->tail = event;
    }
}

/* Reads the control file's faults and posts its events. Caller holds `lock`. */
static void read_control(const char *path)
{
    lost_gpus = 0;
    no_event_gpus = 0;
    no_permission_gpus = 0;
    no_power_cap_gpus = 0;
    FILE *file = fopen(path, "r");
    if (file == NULL)
        return;
    char line[256];
    while (fgets(line, sizeof line, file) != NULL) {
        unsigned int index, xid;
        unsigned int gpu_instance = FAKE_NO_INSTANCE, compute_instance = FAKE_NO_INSTANCE;
        if (sscanf(line, " lost %u", &index) == 1 && index < 64)
            lost_gpus |= 1ULL << index;
        else if (sscanf(line, " noevents %u", &index) == 1 && index < 64)
            no_event_gpus |= 1ULL << index;
        else if (sscanf(line, " nopermission %u", &index) == 1 && index < 64)
            no_permission_gpus |= 1ULL << index;
        else if (sscanf(line, " nopowercap %u", &index) == 1 && index < 64)
            no_power_cap_gpus |= 1ULL << index;
        else if (sscanf(line, " xid %u %u %u %u", &index, &xid, &gpu_instance,
                        &compute_instance) >= 2)
            post_event(index, nvmlEventTypeXidCriticalError, xid, gpu_instance,
                       compute_instance);
    }
    fclose(file);
}

/* Re-reads the control file when stat() shows it changed. Caller holds `lock`. */
static void refresh_control(void)
{
    struct stat st;
    if (control_path == NULL)
        return;
    if (stat(control_path, &st) != 0) {
        control_seen = 0;
        lost_gpus = 0;
        no_event_gpus = 0;
        no_permission_gpus = 0;
        no_power_cap_gpus = 0;
        return;
    }
    if (control_seen && st.st_ino == control_stat.st_ino && st.st_size == control_stat.st_size &&
        st.st_mtim.tv_sec == control_stat.st_mtim.tv_sec &&
        st.st_mtim.tv_nsec == control_stat.st_mtim.tv_nsec)
        return;
    control_stat = st;
    control_seen = 1;
    read_control(control_path);
}

static int is_lost(unsigned int gpu_index)
{
    pthread_mutex_lock(&lock);
    refresh_control();
    int lost = gpu_index < 64 && (lost_gpus >> gpu_index) & 1U;
    pthread_mutex_unlock(&lock);
    return lost;
}

static int is_valid_handle(nvmlDevice_t device)
{
    uintptr_t first = (uintptr_t)fake_devices;
    uintptr_t address = (uintptr_t)device;
    return address >= first && address < first + fake_device_count * sizeof fake_devices[0] &&
           (address - first) % sizeof fake_devices[0] == 0;
}

/* The checks every device query starts with; `out` is its (first) output pointer. */
static nvmlReturn_t check_device(nvmlDevice_t device, const void *out)
{
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    if (!is_valid_handle(device) || out == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (is_lost(device->gpu_index))
        return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

#define CHECK(device, out)                                      \
    do {                                                        \
        nvmlReturn_t check_result_ = check_device(device, out); \
        if (check_result_ != NVML_SUCCESS)                      \
            return check_result_;                               \
    } while (0)

static nvmlReturn_t put_uint(fake_value value, unsigned int *out)
{
    if (!value.ok)
        return NVML_ERROR_NOT_SUPPORTED;
    *out = (unsigned int)value.v;
    return NVML_SUCCESS;
}

static nvmlReturn_t put_ull(fake_value value, unsigned long long *out)
{
    if (!value.ok)
        return NVML_ERROR_NOT_SUPPORTED;
    *out = (unsigned long long)value.v;
    return NVML_SUCCESS;
}

static nvmlReturn_t put_string(const char *value, char *out, unsigned int length)
{
    if (value == NULL)
        return NVML_ERROR_NOT_SUPPORTED;
    if (strlen(value) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, value);
    return NVML_SUCCESS;
}

static nvmlReturn_t put_handle(nvmlDevice_t found, nvmlDevice_t *out)
{
    if (is_lost(found->gpu_index))
        return NVML_ERROR_GPU_IS_LOST;
    *out = found;
    return NVML_SUCCESS;
}

static fake_value energy_mj(nvmlDevice_t device)
{
    fake_value energy = {0, 0};
    if (device->power_usage_mw.ok) {
        energy.ok = 1;
        /* mW x ms / 1000 = mJ */
        energy.v = (long long)fake_energy_base_mj +
                   device->power_usage_mw.v * elapsed_ms_since_init() / 1000;
    }
    return energy;
}

/* -------------------------------------------------------- init and system */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    if (env_flag("FAKENVML_INIT_CRASH"))
        raise(SIGSEGV);
    if (env_flag("FAKENVML_INIT_HANG"))
        for (;;)
            sleep(1);
    const char *result = getenv("FAKENVML_INIT_RESULT");
    if (result != NULL && result[0] != '\0') {
        nvmlReturn_t injected = parse_init_result(result);
        if (injected != NVML_SUCCESS)
            return injected;
    }

    pthread_mutex_lock(&lock);
    if (init_count++ == 0) {
        const char *path = getenv("FAKENVML_CONTROL");
        control_path = path != NULL && path[0] != '\0' ? strdup(path) : NULL;
        control_seen = 0;
        lost_gpus = 0;
        no_event_gpus = 0;
        no_permission_gpus = 0;
        no_power_cap_gpus = 0;
        memset(set_power_limit_mw, 0, sizeof set_power_limit_mw);
        clock_gettime(CLOCK_MONOTONIC, &init_time);
    }
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void)
{
    return nvmlInitWithFlags(0);
}

nvmlReturn_t nvmlInit(void)
{
    return nvmlInitWithFlags(0);
}

nvmlReturn_t nvmlShutdown(void)
{
    nvmlReturn_t result = NVML_SUCCESS;
    pthread_mutex_lock(&lock);
    if (init_count == 0) {
        result = NVML_ERROR_UNINITIALIZED;
    } else if (--init_count == 0) {
        free(control_path);
        control_path = NULL;
    }
    pthread_mutex_unlock(&lock);
    return result;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if (errors[i].code == (int)result)
            return errors[i].message;
    return "Unknown Error";
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    if (version == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    return put_string(fake_driver_version, version, length);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    if (version == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    return put_string(fake_nvml_version, version, length);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion)
{
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    if (cudaDriverVersion == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    return put_uint(fake_cuda_driver_version, (unsigned int *)cudaDriverVersion);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion)
{
    return nvmlSystemGetCudaDriverVersion(cudaDriverVersion);
}

/* ---------------------------------------------------------- enumeration */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    if (deviceCount == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *deviceCount = fake_gpu_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return nvmlDeviceGetCount_v2(deviceCount);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    if (index >= fake_gpu_count || device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    return put_handle(&fake_devices[index], device);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

/* GPU and MIG UUIDs are both accepted, as by the real library. */
nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    if (uuid == NULL || device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < fake_device_count; i++)
        if (fake_devices[i].uuid != NULL && strcmp(fake_devices[i].uuid, uuid) == 0)
            return put_handle(&fake_devices[i], device);
    return NVML_ERROR_NOT_FOUND;
}

/* Accepts "domain:bus:device.function" and "bus:device.function", in hex, any case. */
nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device)
{
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    if (pciBusId == NULL || device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int domain = 0, bus, slot, function;
    if (sscanf(pciBusId, "%x:%x:%x.%x", &domain, &bus, &slot, &function) != 4) {
        domain = 0;
        if (sscanf(pciBusId, "%x:%x.%x", &bus, &slot, &function) != 3)
            return NVML_ERROR_INVALID_ARGUMENT;
    }
    for (unsigned int i = 0; i < fake_gpu_count; i++) {
        const struct nvmlDevice_st *gpu = &fake_devices[i];
        if (gpu->pci_bus_id != NULL && gpu->pci_domain == domain && gpu->pci_bus == bus &&
            gpu->pci_device == slot && function == 0)
            return put_handle(gpu, device);
    }
    return NVML_ERROR_NOT_FOUND;
}

/* --------------------------------------------------------------- identity */

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    CHECK(device, name);
    return put_string(device->name, name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    CHECK(device, uuid);
    return put_string(device->uuid, uuid, length);
}

nvmlReturn_t nvmlDeviceGetSerial(nvmlDevice_t device, char *serial, unsigned int length)
{
    CHECK(device, serial);
    return put_string(device->serial, serial, length);
}

nvmlReturn_t nvmlDeviceGetVbiosVersion(nvmlDevice_t device, char *version, unsigned int length)
{
    CHECK(device, version);
    return put_string(device->vbios_version, version, length);
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber)
{
    CHECK(device, minorNumber);
    return put_uint(device->minor_number, minorNumber);
}

/* The whole structure or nothing: it needs the bus id and both PCI ids. */
nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    CHECK(device, pci);
    if (device->pci_bus_id == NULL || !device->pci_device_id.ok || !device->pci_subsystem_id.ok)
        return NVML_ERROR_NOT_SUPPORTED;
    memset(pci, 0, sizeof *pci);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.0", device->pci_domain,
             device->pci_bus, device->pci_device);
    snprintf(pci->busId, sizeof pci->busId, "%s", device->pci_bus_id);
    pci->domain = device->pci_domain;
    pci->bus = device->pci_bus;
    pci->device = device->pci_device;
    pci->pciDeviceId = (unsigned int)device->pci_device_id.v;
    pci->pciSubSystemId = (unsigned int)device->pci_subsystem_id.v;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor)
{
    CHECK(device, major);
    if (minor == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!device->cuda_cc_major.ok || !device->cuda_cc_minor.ok)
        return NVML_ERROR_NOT_SUPPORTED;
    *major = (int)device->cuda_cc_major.v;
    *minor = (int)device->cuda_cc_minor.v;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNumaNodeId(nvmlDevice_t device, unsigned int *node)
{
    CHECK(device, node);
    return put_uint(device->numa_node_id, node);
}

/* ----------------------------------------------------------------- memory */

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    CHECK(device, memory);
    if (!device->memory_total.ok || !device->memory_free.ok)
        return NVML_ERROR_NOT_SUPPORTED;
    memory->total = (unsigned long long)device->memory_total.v;
    memory->free = (unsigned long long)device->memory_free.v;
    memory->used = memory->total - memory->free;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    CHECK(device, memory);
    if (memory->version != nvmlMemory_v2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (!device->memory_total.ok || !device->memory_reserved.ok || !device->memory_free.ok ||
        !device->memory_used.ok)
        return NVML_ERROR_NOT_SUPPORTED;
    memory->total = (unsigned long long)device->memory_total.v;
    memory->reserved = (unsigned long long)device->memory_reserved.v;
    memory->free = (unsigned long long)device->memory_free.v;
    memory->used = (unsigned long long)device->memory_used.v;
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------ power */

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    CHECK(device, power);
    return put_uint(device->power_usage_mw, power);
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy)
{
    CHECK(device, energy);
    return put_ull(energy_mj(device), energy);
}

/* A captured limit, or the one nvmlDeviceSetPowerManagementLimit set in its place. */
static fake_value power_limit(nvmlDevice_t device, fake_value captured)
{
    pthread_mutex_lock(&lock);
    unsigned int set = device->is_mig || device->gpu_index >= 64
                           ? 0
                           : set_power_limit_mw[device->gpu_index];
    pthread_mutex_unlock(&lock);
    if (set != 0) {
        captured.ok = 1;
        captured.v = set;
    }
    return captured;
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    CHECK(device, limit);
    return put_uint(power_limit(device, device->enforced_power_limit_mw), limit);
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit)
{
    CHECK(device, limit);
    return put_uint(power_limit(device, device->power_limit_mw), limit);
}

/* MIG instances share their GPU's limit; only GPUs with captured constraints take one. */
nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned int limit)
{
    CHECK(device, device);
    if (device->is_mig || device->gpu_index >= 64 || !device->min_power_limit_mw.ok ||
        !device->max_power_limit_mw.ok)
        return NVML_ERROR_NOT_SUPPORTED;
    nvmlReturn_t result = NVML_SUCCESS;
    unsigned long long bit = 1ULL << device->gpu_index;
    pthread_mutex_lock(&lock);
    refresh_control();
    if (no_power_cap_gpus & bit)
        result = NVML_ERROR_NOT_SUPPORTED;
    else if (no_permission_gpus & bit)
        result = NVML_ERROR_NO_PERMISSION;
    else if (limit < device->min_power_limit_mw.v || limit > device->max_power_limit_mw.v)
        result = NVML_ERROR_INVALID_ARGUMENT;
    else
        set_power_limit_mw[device->gpu_index] = limit;
    pthread_mutex_unlock(&lock);
    return result;
}

nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device,
                                                      unsigned int *defaultLimit)
{
    CHECK(device, defaultLimit);
    return put_uint(device->default_power_limit_mw, defaultLimit);
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t device,
                                                          unsigned int *minLimit,
                                                          unsigned int *maxLimit)
{
    CHECK(device, minLimit);
    if (maxLimit == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!device->min_power_limit_mw.ok || !device->max_power_limit_mw.ok)
        return NVML_ERROR_NOT_SUPPORTED;
    *minLimit = (unsigned int)device->min_power_limit_mw.v;
    *maxLimit = (unsigned int)device->max_power_limit_mw.v;
    return NVML_SUCCESS;
}

/* ----------------------------------------------------------------- clocks */

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock)
{
    CHECK(device, clock);
    if ((unsigned int)type >= NVML_CLOCK_COUNT)
        return NVML_ERROR_INVALID_ARGUMENT;
    return put_uint(device->clock_mhz[type], clock);
}

nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t device, nvmlClockType_t type,
                                       unsigned int *clock)
{
    CHECK(device, clock);
    if ((unsigned int)type >= NVML_CLOCK_COUNT)
        return NVML_ERROR_INVALID_ARGUMENT;
    return put_uint(device->max_clock_mhz[type], clock);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                                    unsigned long long *clocksEventReasons)
{
    CHECK(device, clocksEventReasons);
    return put_ull(device->clocks_event_reasons, clocksEventReasons);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device,
                                                       unsigned long long *clocksThrottleReasons)
{
    return nvmlDeviceGetCurrentClocksEventReasons(device, clocksThrottleReasons);
}

nvmlReturn_t nvmlDeviceGetPerformanceState(nvmlDevice_t device, nvmlPstates_t *pState)
{
    CHECK(device, pState);
    return put_uint(device->performance_state, (unsigned int *)pState);
}

/* ------------------------------------------------------------------- PCIe */

nvmlReturn_t nvmlDeviceGetMaxPcieLinkGeneration(nvmlDevice_t device, unsigned int *maxLinkGen)
{
    CHECK(device, maxLinkGen);
    return put_uint(device->pcie_link_gen_max, maxLinkGen);
}

nvmlReturn_t nvmlDeviceGetGpuMaxPcieLinkGeneration(nvmlDevice_t device,
                                                   unsigned int *maxLinkGenDevice)
{
    CHECK(device, maxLinkGenDevice);
    return put_uint(device->pcie_link_gen_gpu_max, maxLinkGenDevice);
}

nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(nvmlDevice_t device, unsigned int *currLinkGen)
{
    CHECK(device, currLinkGen);
    return put_uint(device->pcie_link_gen_current, currLinkGen);
}

nvmlReturn_t nvmlDeviceGetMaxPcieLinkWidth(nvmlDevice_t device, unsigned int *maxLinkWidth)
{
    CHECK(device, maxLinkWidth);
    return put_uint(device->pcie_link_width_max, maxLinkWidth);
}

nvmlReturn_t nvmlDeviceGetCurrPcieLinkWidth(nvmlDevice_t device, unsigned int *currLinkWidth)
{
    CHECK(device, currLinkWidth);
    return put_uint(device->pcie_link_width_current, currLinkWidth);
}

nvmlReturn_t nvmlDeviceGetPcieReplayCounter(nvmlDevice_t device, unsigned int *value)
{
    CHECK(device, value);
    return put_uint(device->pcie_replay_counter, value);
}

/* -------------------------------------------------------------------- ECC */

nvmlReturn_t nvmlDeviceGetEccMode(nvmlDevice_t device, nvmlEnableState_t *current,
                                  nvmlEnableState_t *pending)
{
    CHECK(device, current);
    if (pending == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!device->ecc_mode_current.ok || !device->ecc_mode_pending.ok)
        return NVML_ERROR_NOT_SUPPORTED;
    *current = (nvmlEnableState_t)device->ecc_mode_current.v;
    *pending = (nvmlEnableState_t)device->ecc_mode_pending.v;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, nvmlMemoryErrorType_t errorType,
                                         nvmlEccCounterType_t counterType,
                                         unsigned long long *eccCounts)
{
    CHECK(device, eccCounts);
    if ((unsigned int)errorType > 1 || (unsigned int)counterType > 1)
        return NVML_ERROR_INVALID_ARGUMENT;
    return put_ull(device->ecc_errors[errorType][counterType], eccCounts);
}

/* ---------------------------------------------------- utilisation, thermals */

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    CHECK(device, utilization);
    if (!device->utilization_gpu_pct.ok || !device->utilization_memory_pct.ok)
        return NVML_ERROR_NOT_SUPPORTED;
    utilization->gpu = (unsigned int)device->utilization_gpu_pct.v;
    utilization->memory = (unsigned int)device->utilization_memory_pct.v;
    return NVML_SUCCESS;
}

static nvmlReturn_t put_sampled(fake_value value, unsigned int *utilization,
                                unsigned int *samplingPeriodUs)
{
    if (samplingPeriodUs == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t result = put_uint(value, utilization);
    if (result == NVML_SUCCESS)
        *samplingPeriodUs = fake_utilization_sampling_period_us;
    return result;
}

nvmlReturn_t nvmlDeviceGetEncoderUtilization(nvmlDevice_t device, unsigned int *utilization,
                                             unsigned int *samplingPeriodUs)
{
    CHECK(device, utilization);
    return put_sampled(device->utilization_encoder_pct, utilization, samplingPeriodUs);
}

nvmlReturn_t nvmlDeviceGetDecoderUtilization(nvmlDevice_t device, unsigned int *utilization,
                                             unsigned int *samplingPeriodUs)
{
    CHECK(device, utilization);
    return put_sampled(device->utilization_decoder_pct, utilization, samplingPeriodUs);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensorType,
                                      unsigned int *temp)
{
    CHECK(device, temp);
    if (sensorType != NVML_TEMPERATURE_GPU)
        return NVML_ERROR_INVALID_ARGUMENT;
    return put_uint(device->temperature_gpu_c, temp);
}

nvmlReturn_t nvmlDeviceGetFanSpeed(nvmlDevice_t device, unsigned int *speed)
{
    CHECK(device, speed);
    return put_uint(device->fan_speed_pct, speed);
}

/* -------------------------------------------------------------- processes */

/*
 * The size protocol of nvmlDeviceGet*RunningProcesses: with *infoCount too small
 * the call stores the needed count and returns NVML_ERROR_INSUFFICIENT_SIZE.
 */
static nvmlReturn_t list_processes(nvmlDevice_t device, int graphics, unsigned int *infoCount,
                                   nvmlProcessInfo_t *infos)
{
    CHECK(device, infoCount);
    if (!device->processes_known)
        return NVML_ERROR_NOT_SUPPORTED;
    unsigned int needed = 0;
    for (unsigned int i = 0; i < device->process_count; i++)
        if (graphics ? device->processes[i].graphics : device->processes[i].compute)
            needed++;
    if (*infoCount < needed) {
        *infoCount = needed;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (needed > 0 && infos == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int n = 0;
    for (unsigned int i = 0; i < device->process_count; i++) {
        const fake_process *process = &device->processes[i];
        if (!(graphics ? process->graphics : process->compute))
            continue;
        infos[n].pid = process->pid;
        infos[n].usedGpuMemory = process->used_memory;
        infos[n].gpuInstanceId = process->gpu_instance_id;
        infos[n].computeInstanceId = process->compute_instance_id;
        n++;
    }
    *infoCount = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos)
{
    return list_processes(device, 0, infoCount, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                      nvmlProcessInfo_t *infos)
{
    return list_processes(device, 1, infoCount, infos);
}

/* ----------------------------------------------------------- field values */

static void get_field(nvmlDevice_t device, nvmlFieldValue_t *field)
{
    fake_value value = {0, 0};
    nvmlValueType_t type = NVML_VALUE_TYPE_UNSIGNED_INT;
    switch (field->fieldId) {
    case NVML_FI_DEV_ECC_SBE_VOL_TOTAL:
        value = device->ecc_errors[NVML_MEMORY_ERROR_TYPE_CORRECTED][NVML_VOLATILE_ECC];
        type = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
        break;
    case NVML_FI_DEV_ECC_DBE_VOL_TOTAL:
        value = device->ecc_errors[NVML_MEMORY_ERROR_TYPE_UNCORRECTED][NVML_VOLATILE_ECC];
        type = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
        break;
    case NVML_FI_DEV_MEMORY_TEMP:
        value = device->temperature_memory_c;
        break;
    case NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION:
        value = energy_mj(device);
        type = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
        break;
    case NVML_FI_DEV_PCIE_REPLAY_COUNTER:
        value = device->pcie_replay_counter;
        break;
    case NVML_FI_DEV_POWER_AVERAGE:
        value = device->power_average_mw;
        break;
    case NVML_FI_DEV_POWER_INSTANT:
        value = device->power_instant_mw;
        break;
    default:
        break;
    }

    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    field->timestamp = now.tv_sec * 1000000LL + now.tv_nsec / 1000;
    field->latencyUsec = 0;
    field->valueType = type;
    field->nvmlReturn = value.ok ? NVML_SUCCESS : NVML_ERROR_NOT_SUPPORTED;
    memset(&field->value, 0, sizeof field->value);
    if (type == NVML_VALUE_TYPE_UNSIGNED_LONG_LONG)
        field->value.ullVal = (unsigned long long)value.v;
    else
        field->value.uiVal = (unsigned int)value.v;
}

/* The call itself succeeds; each field carries its own nvmlReturn. */
nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int valuesCount,
                                      nvmlFieldValue_t *values)
{
    CHECK(device, values);
    if (valuesCount <= 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < valuesCount; i++)
        get_field(device, &values[i]);
    return NVML_SUCCESS;
}

/* -------------------------------------------------------------------- MIG */

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode,
                                  unsigned int *pendingMode)
{
    CHECK(device, currentMode);
    if (pendingMode == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!device->mig_mode_current.ok || !device->mig_mode_pending.ok)
        return NVML_ERROR_NOT_SUPPORTED;
    *currentMode = (unsigned int)device->mig_mode_current.v;
    *pendingMode = (unsigned int)device->mig_mode_pending.v;
    return NVML_SUCCESS;
}

static int mig_enabled(nvmlDevice_t gpu)
{
    return gpu->mig_mode_current.ok && gpu->mig_mode_current.v == 1;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count)
{
    CHECK(device, count);
    if (device->is_mig)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = mig_enabled(device) ? fake_max_mig_devices : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                 nvmlDevice_t *migDevice)
{
    CHECK(device, migDevice);
    if (device->is_mig)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!mig_enabled(device))
        return NVML_ERROR_NOT_SUPPORTED;
    if (index >= fake_max_mig_devices)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = fake_gpu_count; i < fake_device_count; i++) {
        if (fake_devices[i].gpu_index == device->gpu_index && fake_devices[i].mig_index == index) {
            *migDevice = &fake_devices[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice)
{
    CHECK(device, isMigDevice);
    *isMigDevice = (unsigned int)device->is_mig;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id)
{
    CHECK(device, id);
    return put_uint(device->gpu_instance_id, id);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id)
{
    CHECK(device, id);
    return put_uint(device->compute_instance_id, id);
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice,
                                                          nvmlDevice_t *device)
{
    CHECK(migDevice, device);
    if (!migDevice->is_mig)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &fake_devices[migDevice->gpu_index];
    return NVML_SUCCESS;
}

/* ----------------------------------------------------------------- events */

static int is_live_set(nvmlEventSet_t set) /* caller holds `lock` */
{
    for (nvmlEventSet_t live = event_sets; live != NULL; live = live->next)
        if (live == set)
            return 1;
    return 0;
}

/* Whether a device takes events at all: physical GPUs without a "noevents" line. */
static int takes_events(nvmlDevice_t device)
{
    pthread_mutex_lock(&lock);
    refresh_control();
    int takes = !device->is_mig && !(device->gpu_index < 64 &&
                                     (no_event_gpus >> device->gpu_index) & 1U);
    pthread_mutex_unlock(&lock);
    return takes;
}

static unsigned long long supported_event_types(nvmlDevice_t device)
{
    unsigned long long types =
        nvmlEventTypeXidCriticalError | nvmlEventTypePState | nvmlEventTypeClock;
    if (device->ecc_mode_current.ok && device->ecc_mode_current.v)
        types |= nvmlEventTypeSingleBitEccError | nvmlEventTypeDoubleBitEccError;
    return types;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    if (set == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlEventSet_t created = calloc(1, sizeof *created);
    unsigned long long *registered = calloc(fake_gpu_count, sizeof *registered);
    if (created == NULL || registered == NULL) {
        free(created);
        free(registered);
        return NVML_ERROR_MEMORY;
    }
    created->registered = registered;
    pthread_mutex_lock(&lock);
    created->next = event_sets;
    event_sets = created;
    pthread_mutex_unlock(&lock);
    *set = created;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes)
{
    CHECK(device, eventTypes);
    if (!takes_events(device))
        return NVML_ERROR_NOT_SUPPORTED;
    *eventTypes = supported_event_types(device);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes,
                                      nvmlEventSet_t set)
{
    CHECK(device, set);
    if (!takes_events(device) || (eventTypes & ~supported_event_types(device)) != 0)
        return NVML_ERROR_NOT_SUPPORTED;
    nvmlReturn_t result = NVML_SUCCESS;
    pthread_mutex_lock(&lock);
    if (is_live_set(set))
        set->registered[device->gpu_index] |= eventTypes;
    else
        result = NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_unlock(&lock);
    return result;
}

/* One attempt of nvmlEventSetWait_v2; NVML_ERROR_TIMEOUT means "nothing yet". */
static nvmlReturn_t take_event(nvmlEventSet_t set, nvmlEventData_t *data)
{
    nvmlReturn_t result = NVML_ERROR_TIMEOUT;
    pthread_mutex_lock(&lock);
    if (!is_live_set(set)) {
        result = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        refresh_control();
        struct fake_event *event = set->head;
        if (event != NULL) {
            *data = event->data;
            set->head = event->next;
            if (set->head == NULL)
                set->tail = NULL;
            free(event);
            result = NVML_SUCCESS;
        } else {
            for (unsigned int i = 0; i < fake_gpu_count && i < 64; i++)
                if (set->registered[i] && (lost_gpus >> i) & 1U)
                    result = NVML_ERROR_GPU_IS_LOST;
        }
    }
    pthread_mutex_unlock(&lock);
    return result;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    if (data == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        nvmlReturn_t result = take_event(set, data);
        clock_gettime(CLOCK_MONOTONIC, &now);
        long long waited_ms =
            (now.tv_sec - start.tv_sec) * 1000LL + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (result != NVML_ERROR_TIMEOUT || waited_ms >= (long long)timeoutms)
            return result;
        const struct timespec poll = {0, 1000000}; /* 1 ms */
        nanosleep(&poll, NULL);
    }
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    if (!is_initialized())
        return NVML_ERROR_UNINITIALIZED;
    pthread_mutex_lock(&lock);
    nvmlEventSet_t *link = &event_sets;
    while (*link != NULL && *link != set)
        link = &(*link)->next;
    if (*link == NULL) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *link = set->next;
    pthread_mutex_unlock(&lock);
    while (set->head != NULL) {
        struct fake_event *event = set->head;
        set->head = event->next;
        free(event);
    }
    free(set->registered);
    free(set);
    return NVML_SUCCESS;
}
